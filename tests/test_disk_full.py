"""A really full disk and output paths that cannot be written: one line naming the file, nothing
partial left, earlier files kept, and output folders checked before the work. The full disk is a
2 MB tmpfs the test mounts (it needs root, as CI runs; elsewhere those tests skip and say why)."""
import glob
import logging
import os
import subprocess

import pytest
import torch

import main as train_script
import validate
import validate_seg
from engine import CheckpointSaver, DiskFullError, save_image, write_atomically
from engine.summary import read_summary, write_summary
from utils.cli import UsageError

# The one reason every test of a real small filesystem gives when it is skipped (pytest -rs shows it;
# docs/install.md can quote it): not root, or `mount -t tmpfs` refused or missing.
NEEDS_TMPFS = 'needs root and a tmpfs mount (mount -t tmpfs): a real 2 MB filesystem to fill and make read-only'


def mount(path, options):
    """Mount a tmpfs at `path`, or skip the test with NEEDS_TMPFS (mount's own message is logged)."""
    try:
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True,
                              text=True)
    except OSError as e:  # no mount command
        logging.getLogger(__name__).warning('mount: %s', e)
        pytest.skip(NEEDS_TMPFS)
    if done.returncode:
        logging.getLogger(__name__).warning('mount -t tmpfs: %s', done.stderr.strip())
        pytest.skip(NEEDS_TMPFS)


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB filesystem of its own."""
    if os.geteuid() != 0:
        pytest.skip(NEEDS_TMPFS)
    fs = tmp_path / 'fs'
    fs.mkdir()
    mount(fs, 'size=2m')
    yield fs
    subprocess.run(['umount', '-l', str(fs)], check=False)


def fill(fs):
    """Fill the filesystem to the last byte (what a real disk does to the next writer)."""
    with open(fs / 'filler', 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'\1' * 4096)
        except OSError:
            pass
    assert os.statvfs(fs).f_bavail == 0


def leftovers(fs):
    return sorted(os.path.basename(p) for p in glob.glob(str(fs / '**' / '*'), recursive=True)
                  if p.endswith('.partial') or os.path.getsize(p) == 0)


@pytest.fixture
def seg_run(tmp_path):
    """Data and checkpoint paths that are never read: the output checks come before any work."""
    return str(tmp_path / 'no-data'), str(tmp_path / 'no-checkpoint.pth.tar')


def test_a_real_full_disk_is_said_and_the_earlier_checkpoint_kept(small_fs):
    model = torch.nn.Linear(16, 16)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=None, checkpoint_dir=str(small_fs))
    saver.save_checkpoint(0, metric=1.0, summary_row={'epoch': 0})
    write_summary(str(small_fs / 'summary.csv'), saver.summary_rows)
    fill(small_fs)
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    # torch's zip writer hides ENOSPC ("unexpected pos"): the free space says what happened
    with pytest.raises(DiskFullError, match=r'no space left on device while writing .*last\.pth\.tar\.partial; the '
                                            r'earlier checkpoints in .* are kept'):
        saver.save_checkpoint(1, metric=2.0, summary_row={'epoch': 1})
    with pytest.raises(DiskFullError, match=r'no space left on device while writing .*summary\.csv\.partial'):
        write_summary(str(small_fs / 'summary.csv'), [{'epoch': 0}, {'epoch': 1, 'x': 'y' * 10000}])
    with pytest.raises(DiskFullError, match=r'pred\.png\.partial'):
        from PIL import Image
        save_image(Image.new('RGB', (256, 256)), str(small_fs / 'pred.png'))
    with pytest.raises(DiskFullError, match=r'results\.json\.partial'):
        write_atomically(str(small_fs / 'results.json'), b'{}' * 10000)
    assert leftovers(small_fs) == []
    kept = torch.load(small_fs / 'last.pth.tar', weights_only=False)
    assert kept['epoch'] == 0 and torch.equal(kept['state_dict']['weight'], saved_weight)
    assert [r['epoch'] for r in read_summary(str(small_fs / 'summary.csv'))] == ['0']


def test_training_onto_a_full_disk_stops_with_one_line(shapes, small_fs, caplog):
    with pytest.raises(SystemExit) as exit_info:
        train_script.cli([shapes, *['--model', 'volo_d1', '--img-size', '32', '-b', '8', '--warmup-epochs', '0',
                                    '--cooldown-epochs', '0', '-j', '0', '--aa', '', '--reprob', '0'],
                          '--epochs', '1', '--output', str(small_fs)])
    assert exit_info.value.code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and 'no space left on device while writing' in errors[0].getMessage()
    assert 'last.pth.tar.partial' in errors[0].getMessage()
    assert not glob.glob(str(small_fs / '**' / '*.partial'), recursive=True)


def test_outputs_on_a_full_disk_are_refused_before_evaluating(seg_run, shapes, small_fs, tmp_path, caplog):
    data, run = seg_run
    fill(small_fs)
    caplog.set_level(logging.INFO)
    for option in ('--save-predictions', '--save-overlays'):
        with pytest.raises(UsageError, match=f'{option} .*: cannot write there \\(no space left on device\\)'):
            validate_seg.main([data, '--checkpoint', run, '--mode', 'whole', '-j', '0', option,
                               str(small_fs / 'out')])
    with pytest.raises(UsageError, match=r'--results-file .*: cannot write there \(no space left on device\)'):
        validate_seg.main([data, '--checkpoint', run, '--mode', 'whole', '-j', '0', '--results-file',
                           str(small_fs / 'metrics.json')])
    assert 'Evaluating' not in caplog.text  # refused before any work
    assert leftovers(small_fs) == []


def test_outputs_on_a_read_only_filesystem_are_refused_before_evaluating(seg_run, shapes, small_fs, tmp_path,
                                                                          caplog):
    data, run = seg_run
    classifier = str(tmp_path / 'no-classifier.pth.tar')
    subprocess.run(['mount', '-o', 'remount,ro', str(small_fs)], check=True)
    caplog.clear()
    caplog.set_level(logging.INFO)
    with pytest.raises(UsageError, match=r'--results-file .*r\.csv: cannot write there \(Read-only file system\)'):
        validate.main([shapes, '--checkpoint', classifier, '-j', '0', '--results-file', str(small_fs / 'r.csv')])
    with pytest.raises(UsageError, match=r'--save-overlays .*: cannot write there \(Read-only file system\)'):
        validate_seg.main([data, '--checkpoint', run, '--mode', 'whole', '-j', '0', '--save-overlays',
                           str(small_fs / 'overlays')])
    assert 'Test:' not in caplog.text and 'Evaluating' not in caplog.text


def test_a_file_where_a_folder_is_expected_and_the_reverse(seg_run, tmp_path):
    data, run = seg_run
    a_file = tmp_path / 'taken'
    a_file.write_text('x')
    with pytest.raises(UsageError, match=r'--save-predictions .*taken: cannot write there \(it is a file, not a '
                                         r'folder'):
        validate_seg.main([data, '--checkpoint', run, '-j', '0', '--save-predictions', str(a_file)])
    with pytest.raises(UsageError, match=r'--save-overlays .*: cannot write there \(a file stands where a folder'):
        validate_seg.main([data, '--checkpoint', run, '-j', '0', '--save-overlays', str(a_file / 'below')])
    (tmp_path / 'dir.json').mkdir()
    with pytest.raises(UsageError, match=r'--results-file .*: it is a folder; name a file'):
        validate_seg.main([data, '--checkpoint', run, '-j', '0', '--results-file', str(tmp_path / 'dir.json')])
    assert a_file.read_text() == 'x'
