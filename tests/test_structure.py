"""The repository's import structure: layers -> models -> utils/data/loss/engine -> inference -> scripts, one
way; no script is imported by anything else."""
import ast
import glob
import os

import pytest

from tests.fresh_interpreter import fresh_import_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('layers', 'models', 'utils', 'data', 'loss', 'engine', 'inference')
SCRIPTS = ('main', 'validate', 'predict', 'demo', 'train_seg', 'validate_seg', 'demo_seg', 'train_det', 'validate_det',
           'demo_det', 'hubconf', 'tools')
TOP_LEVEL_SCRIPTS = tuple(s for s in SCRIPTS if s != 'tools')
# what each package may import from this repository (function-level imports count too)
ALLOWED = {'layers': {'layers'}, 'models': {'layers', 'models'}, 'utils': {'layers', 'utils'},
           'data': {'layers', 'data'}, 'loss': {'layers', 'loss'}, 'engine': {'layers', 'utils', 'engine'},
           'inference': {'layers', 'models', 'utils', 'data', 'engine', 'inference'}}
TRAINERS = ('main', 'train_seg', 'train_det')
VALIDATORS = ('validate', 'validate_seg', 'validate_det')


def repo_imports(path, package):
    """Top-level names of this repository's modules that a file imports, anywhere in it."""
    tree = ast.parse(open(path).read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or '']
        else:
            continue
        found |= {n.split('.')[0] for n in names if n.split('.')[0] in PACKAGES + SCRIPTS}
    return found


@pytest.mark.parametrize('package', PACKAGES)
def test_imports_point_one_way(package):
    wrong = {}
    for path in glob.glob(os.path.join(REPO, package, '*.py')):
        bad = repo_imports(path, package) - ALLOWED[package]
        if bad:
            wrong[os.path.relpath(path, REPO)] = sorted(bad)
    assert not wrong, f'imports against the layering: {wrong}'


@pytest.mark.parametrize('script', TRAINERS + VALIDATORS)
def test_task_scripts_use_the_engine_and_not_each_other(script):
    """A trainer's scaffold (run directory, resume, checkpoints, tracking, AMP, the optimizer step)
    and a validator's shared settings come from engine/, never from another task script."""
    path = os.path.join(REPO, script + '.py')
    imported = repo_imports(path, None)
    assert 'engine' in imported
    assert not imported & (set(TRAINERS + VALIDATORS) - {script}), imported
    text = open(path).read()
    for private_copy in ('class CheckpointSaver', 'def init_distributed', 'def native_amp', 'class Tracker',
                         'RunLock(', 'torch.save(', 'NativeScaler(', 'dispatch_clip_grad('):
        assert private_copy not in text, f'{script}.py: {private_copy}'


def test_the_checker_sees_function_level_imports(tmp_path):
    sample = tmp_path / 'x.py'
    sample.write_text('def f():\n    from models.volo import VARIANTS\n    from . import checkpoint\n')
    assert repo_imports(str(sample), 'utils') == {'models', 'utils'}


def test_tools_run_as_modules_without_editing_sys_path():
    for path in glob.glob(os.path.join(REPO, 'tools', '*.py')):
        assert 'sys.path' not in open(path).read(), path
    report = fresh_import_report()  # python -m tools.generate_token_labels --help, from the repository root
    assert report['tool_exit'] == 0 and 'usage' in report['tool_output'], report['tool_output']


def test_importing_the_repository_patches_nothing_in_timm():
    assert fresh_import_report()['timm_ops_unchanged']


def test_one_function_picks_the_outlook_attention_implementation():
    """The kernels register with layers.outlook_attention; nothing else chooses a path."""
    from layers import outlook_attention, outlook_triton
    if outlook_triton.triton_available():
        assert outlook_attention._FUSED['triton'][0] is outlook_triton.outlook_attention_fused
    sources = {p: open(p).read() for p in glob.glob(os.path.join(REPO, '*', '*.py')) + glob.glob(os.path.join(REPO, '*.py'))
               if os.sep + 'tests' + os.sep not in p}
    choosers = [os.path.relpath(p, REPO) for p, text in sources.items()
                if 'fused_kernels_work(' in text and not p.endswith('outlook_triton.py')]
    assert choosers == []


def test_ci_runs_readme_test_command():
    readme = open(os.path.join(REPO, 'README.md')).read()
    block = readme.split('```bash', 1)[1].split('```', 1)[0]
    commands = [line.split('#')[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2 and commands[0].endswith('python demo.py')
    ci = [line.strip() for line in open(os.path.join(REPO, '.ci', 'run')) if line.strip() and not line.startswith('#')]
    assert ci[-1] == commands[1]


def test_tlt_public_names_stay():
    """The token-labeling names notebooks import (tlt's data, loss and utils), here."""
    import data
    import loss
    import utils
    for module, names in ((data, ('create_token_label_target', 'create_token_label_loader',
                                  'create_token_label_dataset', 'TokenLabelMixup', 'DatasetTokenLabel')),
                          (loss, ('TokenLabelCrossEntropy', 'TokenLabelGTCrossEntropy',
                                  'TokenLabelSoftTargetCrossEntropy', 'SoftTargetCrossEntropy')),
                          (utils, ('load_pretrained_weights',))):
        missing = [name for name in names if not callable(getattr(module, name, None))]
        assert not missing, f'{module.__name__}: {missing}'


def test_no_hidden_lookups_through_sys_modules():
    """Model hooks are registered (layers/model_hooks.py), not found through the module a class lives in."""
    sources = glob.glob(os.path.join(REPO, '*.py')) + [p for package in PACKAGES + ('tools',)
                                                        for p in glob.glob(os.path.join(REPO, package, '*.py'))]
    assert not [os.path.relpath(p, REPO) for p in sources if 'sys.modules' in open(p).read()]


def test_every_family_registers_its_checkpoint_hooks():
    import models
    from layers import model_hooks
    from models.segmentation import build_segmentor
    for family, model in ((models.volo, models.volo_d1(img_size=64)), (models.visformer, models.visformer_tiny())):
        hooks = model_hooks(model)
        assert hooks.variants == tuple(family.VARIANTS)
        assert (hooks.checkpoint_filter_fn, hooks.checkpoint_variant) == (family.checkpoint_filter_fn,
                                                                          family.checkpoint_variant)
    assert model_hooks(build_segmentor('volo_d1', 3, img_size=(32, 32))).checkpoint_variant is \
        models.segmentation.checkpoint_variant


def test_no_top_level_script_is_imported_by_anything_else():
    """What scripts share lives below them (engine/, inference/): no script, tool, package or notebook
    imports a top-level script (the tests do, to run them)."""
    import json
    sources = [p for p in glob.glob(os.path.join(REPO, '*.py')) if os.path.basename(p) not in ('conftest.py',)]
    sources += [p for package in PACKAGES + ('tools',) for p in glob.glob(os.path.join(REPO, package, '*.py'))]
    wrong = {}
    for path in sources:
        package = os.path.basename(os.path.dirname(path)) if os.path.dirname(path) != REPO else None
        found = repo_imports(path, package) & set(TOP_LEVEL_SCRIPTS)
        if found:
            wrong[os.path.relpath(path, REPO)] = sorted(found)
    for path in glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb')):
        code = '\n'.join(''.join(c['source']) for c in json.load(open(path))['cells'] if c['cell_type'] == 'code')
        found = {n for n in TOP_LEVEL_SCRIPTS if f'import {n}' in code or f'from {n} ' in code}
        if found:
            wrong[os.path.relpath(path, REPO)] = sorted(found)
    assert not wrong, f'scripts imported by others: {wrong}'
