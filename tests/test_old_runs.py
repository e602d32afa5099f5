"""Runs written before the shared engine resume and validate with today's code. The old runs are
made by the code of commit BEFORE_ENGINE itself (main.py and train_seg.py with their own
scaffolds, segmentation's old option names and checkpoints that stored the iteration as `epoch`),
taken out of this repository's history."""
import glob
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
import yaml

import train_det
import train_seg
import validate
import validate_seg
from data.synthetic_seg import make_seg_dataset
from engine.summary import read_summary
from tests.training_runs import FAST_D1, run_fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE_ENGINE = '149d415ae1a4b94169a2b2756ae914f0439384ef'
OLD_SEG = ['--model', 'volo_d1', '--crop-size', '32', '32', '-b', '2', '--warmup-iters', '1', '-j', '0',
           '--log-interval', '1', '--head-channels', '32', '--aux-channels', '16', '--drop-path', '0',
           '--eval-interval', '2', '--eval-mode', 'whole']


def extract(commit, dest):
    """The files of `commit` of this repository, written under `dest`."""
    archive = subprocess.run(['git', '-C', REPO, 'archive', '--format=tar', commit], capture_output=True)
    assert archive.returncode == 0, (f'commit {commit} is not in this clone (clone with its history, not '
                                     f'--depth 1): {archive.stderr.decode()}')
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter='data')
    return dest


@pytest.fixture(scope='module')
def old_code(tmp_path_factory):
    return extract(BEFORE_ENGINE, tmp_path_factory.mktemp('before_engine'))


# both old runs in one interpreter (one costs about 10 s of CPU here): each script as `python SCRIPT` runs it
RUN_OLD_SCRIPTS = '''
import json, runpy, sys
for script, *args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        if e.code:
            raise
'''


@pytest.fixture(scope='module')
def old_runs(old_code, shapes, tmp_path_factory):
    """{'cls' / 'seg': (output folder, data)} of a classification and a segmentation run that the old
    code made."""
    root = tmp_path_factory.mktemp('old_runs')
    seg_data = make_seg_dataset(str(root / 'seg_data'), 'seg-folder', num_classes=4, train=4, val=2, size=(48, 48))
    runs = {'cls': (root / 'cls', shapes), 'seg': (root / 'seg', seg_data)}
    scripts = [['main.py', shapes, *FAST_D1, '--output', runs['cls'][0], '--epochs', '1'],
               ['train_seg.py', seg_data, '--dataset', 'folder', '--scale', 96, 64, *OLD_SEG, '--iters', 2,
                '--output', runs['seg'][0]]]
    run_old_scripts(old_code, scripts)
    return runs


def run_old_scripts(code, scripts):
    """`scripts` ([script, arguments...]) run one after the other by the old code in `code`, in one
    interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('PYTHONPATH', None)
    done = subprocess.run([sys.executable, '-c', RUN_OLD_SCRIPTS, json.dumps([list(map(str, s)) for s in scripts])],
                          cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_classification_run_from_before_resumes_and_validates(old_runs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out, shapes = old_runs['cls']
    [run] = glob.glob(str(out / 'train' / '*'))
    old_checkpoint = tmp_path / 'old_last.pth.tar'
    shutil.copy(os.path.join(run, 'last.pth.tar'), old_checkpoint)
    old_rows = read_summary(os.path.join(run, 'summary.csv'))

    assert run_fast(shapes, out, '--model', 'volo_d1', '--epochs', '2', '--resume', 'auto') == run  # the old run's model
    assert 'continuing at epoch 1' in caplog.text
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [r['epoch'] for r in rows] == ['0', '1'] and rows[0] == old_rows[0]
    assert torch.load(os.path.join(run, 'last.pth.tar'), weights_only=False)['epoch'] == 1

    [old_result] = validate.main([shapes, '--checkpoint', str(old_checkpoint), '-j', '0'])
    assert old_result['top1'] == pytest.approx(float(old_rows[0]['eval_top1']), abs=1e-4)  # validate rounds to 4


def test_a_segmentation_run_from_before_resumes_and_validates(old_runs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out, data = old_runs['seg']
    [run] = glob.glob(str(out / 'train_seg' / '*'))
    old_checkpoint = tmp_path / 'old_last.pth.tar'
    shutil.copy(os.path.join(run, 'last.pth.tar'), old_checkpoint)
    old = torch.load(old_checkpoint, weights_only=False)
    assert old['epoch'] == 2 and 'iteration' not in old  # the old layout
    assert yaml.safe_load(open(os.path.join(run, 'args.yaml')))['scale'] == [96, 64]

    # today's spellings find the old run: its dataset kind and option names are read as today's
    assert train_seg.main([data, '--dataset', 'seg-folder', '--img-scale', '96', '64', *OLD_SEG, '--iters', '4',
                           '--output', str(out), '--resume', 'auto']) == run
    assert 'continuing at iteration 2' in caplog.text
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [r['iteration'] for r in rows] == ['2', '4'] and all(r['eval_mIoU'] for r in rows)
    assert torch.load(os.path.join(run, 'last.pth.tar'), weights_only=False)['iteration'] == 4

    old_results = validate_seg.main([data, '--checkpoint', str(old_checkpoint), '--mode', 'whole', '-j', '0'])
    assert old_results['dataset'] == 'seg-folder' and old_results['crop_size'] == [32, 32]  # 'folder' read as today's
    assert old_results['mIoU'] == pytest.approx(float(rows[0]['eval_mIoU']), abs=1e-6)


BEFORE_STEP = '099819cb6fad51b2a2e7e7711b2f4049cc5eac1a'  # the last commit whose trainers wrote their own step


@pytest.fixture(scope='module')
def runs_before_step(shapes, tmp_path_factory):
    """{'cls' / 'seg' / 'det': (output folder, data)} of runs that the code of BEFORE_STEP made, each
    trainer with its own optimizer step: main.py with --amp (recorded as amp_dtype float16; bfloat16
    ran on the CPU), train_seg.py and train_det.py."""
    from data.synthetic_det import make_coco_dataset
    code = extract(BEFORE_STEP, tmp_path_factory.mktemp('before_step'))
    root = tmp_path_factory.mktemp('runs_before_step')
    seg_data = make_seg_dataset(str(root / 'seg_data'), 'seg-folder', num_classes=4, train=4, val=2, size=(48, 48))
    coco = make_coco_dataset(str(root / 'coco'), train=6, val=4, seed=1)
    runs = {'cls': (root / 'cls', shapes), 'seg': (root / 'seg', seg_data), 'det': (root / 'det', coco)}
    scripts = [['main.py', shapes, *FAST_D1, '--output', runs['cls'][0], '--epochs', '1', '--amp'],
               ['train_seg.py', seg_data, '--dataset', 'seg-folder', '--img-scale', 96, 64, *OLD_SEG, '--iters', 2,
                '--output', runs['seg'][0]],
               ['train_det.py', coco, *OLD_DET, '--epochs', '1', '--lr-steps', '--output', runs['det'][0]]]
    run_old_scripts(code, scripts)
    return runs


OLD_DET = ['--model', 'volo_d1', '--fpn-channels', '16', '--train-sizes', '64', '--test-size', '64', '--max-size',
           '100', '-b', '2', '--warmup-iters', '2', '-j', '0', '--log-interval', '1', '--drop-path', '0']


def test_runs_written_before_the_shared_step_continue(runs_before_step, caplog):
    """The same commands with --resume auto find each run and continue it where it stopped: one
    more epoch or evaluation interval, the earlier summary rows kept."""
    caplog.set_level(logging.INFO)
    out, shapes = runs_before_step['cls']
    [run] = glob.glob(str(out / 'train' / '*'))
    before = read_summary(os.path.join(run, 'summary.csv'))
    assert run_fast(shapes, out, '--model', 'volo_d1', '--epochs', '2', '--amp', '--resume', 'auto') == run
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [r['epoch'] for r in rows] == ['0', '1'] and rows[0] == before[0]

    out, data = runs_before_step['seg']
    [run] = glob.glob(str(out / 'train_seg' / '*'))
    assert train_seg.main([data, '--dataset', 'seg-folder', '--img-scale', '96', '64', *OLD_SEG, '--iters', '4',
                           '--output', str(out), '--resume', 'auto']) == run
    assert [r['iteration'] for r in read_summary(os.path.join(run, 'summary.csv'))] == ['2', '4']

    out, coco = runs_before_step['det']
    [run] = glob.glob(str(out / 'train_det' / '*'))
    assert train_det.main([coco, *OLD_DET, '--epochs', '2', '--lr-steps', '--output', str(out),
                           '--resume', 'auto']) == run
    assert [r['epoch'] for r in read_summary(os.path.join(run, 'summary.csv'))] == ['0', '1']
    assert caplog.text.count('Resumed ') == 3
