"""README.md and docs/: relative links resolve (anchors included), README stays a short front door
that links every docs page. Needs no torch."""
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))
README_MAX_LINES = 200

FENCE = re.compile(r'^\s*(```|~~~)')
LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
IMAGE = re.compile(r'!\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
HEADING = re.compile(r'^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$')
EXTERNAL = ('http://', 'https://', 'mailto:')


def prose_lines(path):
    """The file's lines outside fenced code blocks, with inline code spans removed."""
    inside = False
    for line in open(path, encoding='utf-8').read().splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield re.sub(r'`[^`]*`', '', line)


def links(path):
    """Every Markdown link and image target of the file, outside code."""
    found = []
    for line in prose_lines(path):
        found += LINK.findall(line) + IMAGE.findall(line)
    return found


def slug(heading):
    """GitHub's anchor of a heading: markup dropped, lowercase, characters other than letters,
    digits, spaces, hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link in a heading keeps its text
    text = text.replace('`', '').replace('*', '').lower()
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(path):
    """The anchors of a Markdown file's headings (repeated headings get -1, -2, ... as on GitHub)."""
    seen, result = {}, set()
    for line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f'{base}-{count}')
    return result


def broken_links(path):
    """(target, why) for every relative link of `path` that does not resolve."""
    broken = []
    for target in links(path):
        if target.lower().startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            broken.append((target, 'no such file or directory'))
            continue
        if anchor:
            if not resolved.endswith('.md') or os.path.isdir(resolved):
                broken.append((target, 'an anchor into something that is not a Markdown file'))
            elif anchor not in anchors(resolved):
                broken.append((target, f'no heading with the anchor #{anchor} in {os.path.relpath(resolved, REPO)}'))
    return broken


def test_there_are_docs_pages():
    assert DOCS, 'docs/*.md: no pages'


@pytest.mark.parametrize('path', [README] + DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_docs_relative_links_resolve(path):
    broken = broken_links(path)
    assert not broken, f'{os.path.relpath(path, REPO)}: broken links: {broken}'


@pytest.mark.parametrize('path', DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_docs_page_starts_with_a_title_and_links_back_to_readme(path):
    lines = open(path, encoding='utf-8').read().splitlines()
    assert lines and re.match(r'^# \S', lines[0]), f'{path}: the first line is not a one-line "# Title"'
    readme = os.path.relpath(README, os.path.dirname(path))
    assert any(t.partition('#')[0] == readme for t in links(path)), f'{path}: no link back to {readme}'


def test_readme_is_short():
    count = len(open(README, encoding='utf-8').read().splitlines())
    assert count <= README_MAX_LINES, f'README.md has {count} lines, at most {README_MAX_LINES}'


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(os.path.join(REPO, t.partition('#')[0])) for t in links(README)
              if not t.lower().startswith(EXTERNAL)}
    missing = [os.path.relpath(p, REPO) for p in DOCS if os.path.normpath(p) not in linked]
    assert not missing, f'docs pages README.md does not link: {missing}'


def test_docs_checker_catches_broken_links(tmp_path):
    """The checker itself: a missing file, a missing anchor and a good link with an anchor."""
    (tmp_path / 'other.md').write_text('# Other page\n\n## Fine-tuning at 384/448/512\n\n## The paper\'s numbers\n')
    page = tmp_path / 'page.md'
    page.write_text('# Page\n\n[ok](other.md#fine-tuning-at-384448512) [ok](other.md#the-papers-numbers) '
                    '[ok](#page) [web](https://example.com/x.md)\n[gone](missing.md) [bad](other.md#nothing)\n'
                    '```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)`\n')
    assert sorted(t for t, _ in broken_links(str(page))) == ['missing.md', 'other.md#nothing']


def test_tools_are_shown_run_as_modules():
    """The tools import the repository's packages, which resolve from its root with `python -m tools.NAME`;
    `python tools/NAME.py` fails with ModuleNotFoundError, so no page or tool shows that form."""
    texts = [README] + DOCS + glob.glob(os.path.join(REPO, 'tools', '*.py'))
    shown = [os.path.relpath(p, REPO) for p in texts if re.search(r'python3? tools/', open(p, encoding='utf-8').read())]
    assert not shown, shown


# files written elsewhere on purpose: scratch files inside a temporary folder, a throwaway dataset
SCRATCH_WRITERS = {os.path.join('tools', 'compile_outlook_kernels.py'): 'a PTX file for ptxas in a temporary folder',
                   os.path.join('tools', 'benchmark_loader.py'): 'its generated dataset, in a temporary folder',
                   os.path.join('engine', 'runs.py'): "a run directory's lock file, held open, never a result"}


def direct_writes(text):
    """The lines of `text` that write a file without engine/files.py's staged writer."""
    found = []
    for line in text.splitlines():
        saved = re.search(r'torch\.save\([^,]+,\s*([^)\s,]+)', line)
        if re.search(r'\.savefig\((?!f\b)', line) or re.search(r"open\([^)]*['\"][wa]b?\+?['\"]", line) or \
                re.search(r'json\.dump\(', line) or (saved and saved.group(1) != 'f'):
            found.append(line.strip())
    return found


def test_every_program_writes_through_the_staged_writer():
    """docs/design.md and training.md: every file the programs write goes under a temporary name,
    synced, moved into place (engine/files.py). The generated demo and test datasets (data/synthetic*)
    are written file by file with a marker written last, as those pages say."""
    programs = glob.glob(os.path.join(REPO, '*.py')) + glob.glob(os.path.join(REPO, 'tools', '*.py')) + [
        p for package in ('engine', 'inference', 'utils') for p in glob.glob(os.path.join(REPO, package, '*.py'))]
    found = {}
    for path in programs:
        name = os.path.relpath(path, REPO)
        if name in SCRATCH_WRITERS or name in (os.path.join('engine', 'files.py'), 'conftest.py'):
            continue
        hits = direct_writes(open(path, encoding='utf-8').read())
        if hits:
            found[name] = hits
    assert not found, found
    assert direct_writes("fig.savefig(path)\ntorch.save(x, 'a.pt')\nopen(p, 'w')") == [
        'fig.savefig(path)', "torch.save(x, 'a.pt')", "open(p, 'w')"]
    assert direct_writes('figure.savefig(f, format=kind)\ntorch.save(state, f)') == []


def test_install_page_names_every_test_requirement():
    page = open(os.path.join(REPO, 'docs', 'install.md'), encoding='utf-8').read()
    names = [re.split(r'[<>=\[ ]', line.strip())[0] for line in open(os.path.join(REPO, 'requirements-test.txt'))
             if line.strip() and not line.startswith('#')]
    assert names and not [n for n in names if f'`{n}`' not in page]
