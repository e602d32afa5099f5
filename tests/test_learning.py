"""Learning is asserted. Real images: scikit-learn's handwritten digits written as an ImageNet-style
folder (tools/digits.py), trained by main.py and validated by validate.py on the held-out split, far
above chance. The demos: each one's whole code path at a reduced size, in this process, and its exit
code: 1 with one line when the model did not learn (a learning rate of 0), 0 when it did."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import demo
import demo_det
import demo_seg
import main as train_script
import validate as validate_script
from tools import digits

DIGITS_MIN_TOP1 = 85.0  # percent on the 359 held-out digits; chance 10%; measured 95.3-96.9 over seeds 0-5
NO_LEARNING = ['--lr', '0']  # the weights never move (main.py: with --min-lr 0 and no warmup)


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
    return digits.write_digits_folder(str(tmp_path_factory.mktemp('digits')), size=32)


def _stems(folder):
    return {int(os.path.splitext(name)[0]): int(c) for c in os.listdir(folder) for name in os.listdir(
        os.path.join(folder, c))}


def test_digits_folder_holds_the_real_scans_with_a_fixed_stratified_split(digits_folder, capsys):
    images, labels = digits.load_digits()
    assert images.shape == (1797, 8, 8) and images.max() == 16
    train, val = _stems(os.path.join(digits_folder, 'train')), _stems(os.path.join(digits_folder, 'val'))
    assert (len(train), len(val)) == (1438, 359) and not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(1797))
    assert all(labels[i] == c for i, c in {**train, **val}.items())  # each scan in its own digit's folder
    for c in range(10):  # every class held out at 20%, to the nearest image
        members = int((labels == c).sum())
        assert sum(1 for v in val.values() if v == c) == round(0.2 * members)
    record = json.load(open(os.path.join(digits_folder, digits.SPLIT_FILE)))
    assert record['val_indices'] == sorted(val) and record['settings'] == {'size': 32, 'val_fraction': 0.2, 'seed': 0}
    assert [a.tolist() for a in digits.stratified_split(labels)] == [sorted(train), sorted(val)]  # same split again
    assert digits.stratified_split(labels, seed=1)[1].tolist() != sorted(val)
    index = sorted(val)[0]
    with Image.open(os.path.join(digits_folder, 'val', str(labels[index]), f'{index:04d}.png')) as png:
        pixels = np.asarray(png)
    assert png.mode == 'L' and pixels.shape == (32, 32)
    assert np.array_equal(pixels[::4, ::4], np.round(images[index] * 255 / 16).astype(np.uint8))  # the scan, 4x
    assert not [p for p in os.listdir(os.path.join(digits_folder, 'val', '0')) if p.endswith('.partial')]

    before = os.path.getmtime(os.path.join(digits_folder, digits.SPLIT_FILE))
    assert digits.main([digits_folder]) == 0  # written already: left as it is
    assert os.path.getmtime(os.path.join(digits_folder, digits.SPLIT_FILE)) == before
    assert '1438 training and 359 held-out digits at 32 px' in capsys.readouterr().out
    assert digits.main([digits_folder, '--size', '16']) == 2  # other settings: refused in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'holds the digits written with' in err[0] and 'choose another folder' in err[0]


def test_volo_learns_real_handwritten_digits(digits_folder, tmp_path):
    """main.py trains volo_test (tests/small_models.py) from scratch on the 1,438 training digits at 32
    px (11 to 26 s on one thread); validate.py scores its last checkpoint, chosen without looking at
    the held-out split, on the 359 held-out digits."""
    run = train_script.main([digits_folder, '--model', 'volo_test', '--img-size', '32', '-b', '32', '--lr', '2e-3',
                             '--epochs', '10', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--scale', '0.6', '1',
                             '--hflip', '0', '--aa', '', '--reprob', '0', '-j', '0', '--log-interval', '50',
                             '--checkpoint-hist', '0', '--seed', '0', '--output', str(tmp_path)])
    rows = validate_script.main([digits_folder, '--checkpoint', os.path.join(run, 'last.pth.tar'), '-j', '0'])
    assert rows[0]['num_images'] == 359 and rows[0]['img_size'] == 32
    assert rows[0]['top1'] >= DIGITS_MIN_TOP1, f'held-out top-1 {rows[0]["top1"]:.1f}% (chance 10%)'


def _run_demo(module, argv, capsys):
    """The demo's command line as `python demo*.py` runs it (its cli()): (exit code, the lines on
    stderr that say the model did not learn)."""
    capsys.readouterr()
    code = module.cli(argv)
    said = [line for line in capsys.readouterr().err.splitlines() if 'did not learn' in line]
    return code, said


def test_demo_exit_code_says_whether_the_model_learned(tmp_path, capsys):
    """demo.py at a reduced size (volo_test at 32 px, 32 shapes a class, 5 epochs, about 1 s): it
    learns (exit 0; best top-1 96.9-100% over seeds 0-4); with a learning rate of 0 it does not (exit 1
    and one line)."""
    reduced = ['--data', str(tmp_path / 'shapes'), '--per-class', '32', '--epochs', '5', '-j', '0', '--model',
               'volo_test', '--img-size', '32', '--token-label-size', '2', '--lr', '2e-3', '--warmup-epochs', '0']
    code, said = _run_demo(demo, reduced + ['--output', str(tmp_path / 'learns')], capsys)
    assert (code, said) == (0, [])
    assert len(os.listdir(tmp_path / 'shapes' / 'val' / 'class_0_ellipse')) == 8
    code, said = _run_demo(demo, reduced + ['--output', str(tmp_path / 'frozen'), *NO_LEARNING, '--min-lr', '0'],
                           capsys)
    assert code == 1 and len(said) == 1, said
    assert said[0].startswith('demo.py: the model did not learn: top-1 ')
    assert 'below the 70% this demo requires' in said[0]
    assert demo.not_learned(70.0) is None and demo.not_learned(100.0) is None
    assert 'top-1 69.9% on 4 classes' in demo.not_learned(69.9)


def test_demo_seg_exits_1_in_one_line_when_the_model_did_not_learn(tmp_path, capsys):
    """demo_seg.py's whole path (data, train_seg.py, validate_seg.py with predictions and overlays, the
    majority-class baseline) at a reduced size, with a learning rate of 0."""
    code, said = _run_demo(demo_seg, ['--data', str(tmp_path / 'data'), '--output', str(tmp_path), '--train-images',
                                      '8', '--iters', '2', '-j', '0', '--crop-size', '32', '32', '--img-scale', '48',
                                      '32', '--head-channels', '32', '--aux-channels', '16', '-b', '2',
                                      *NO_LEARNING], capsys)
    assert code == 1 and len(said) == 1, said
    assert said[0].startswith('demo_seg.py: the model did not learn: mIoU ') and 'below the 40 this demo' in said[0]
    run = next((tmp_path / 'train_seg').iterdir())
    assert len(os.listdir(run / 'overlays')) == 1 and (run / 'validation.json').is_file()
    assert demo_seg.not_learned(40.0, 17.0) is None
    assert 'mIoU 39.9 on 5 classes' in demo_seg.not_learned(39.9, 17.0)
    assert 'not above the 45.0 of always predicting the most frequent class' in demo_seg.not_learned(45.0, 45.0)


def test_demo_det_exits_1_in_one_line_when_the_detector_did_not_learn(tmp_path, capsys):
    """demo_det.py's whole path (data, train_det.py, validate_det.py on the trained and the untrained
    detector, overlays, demo.txt) at a reduced size, with a learning rate of 0."""
    code, said = _run_demo(demo_det, ['--data', str(tmp_path / 'data'), '--output', str(tmp_path), '--train-images',
                                      '10', '--epochs', '1', '-j', '0', '--fpn-channels', '16', '--train-sizes', '64',
                                      '--test-size', '64', '--max-size', '100', '-b', '2', '--eval-batch-size', '2',
                                      *NO_LEARNING], capsys)
    assert code == 1 and len(said) == 1, said
    assert said[0].startswith('demo_det.py: the detector did not learn: box AP ')
    assert 'and mask AP' in said[0] and 'below the 25 this demo requires' in said[0]
    run = next((tmp_path / 'train_det').iterdir())
    assert (run / 'demo.txt').is_file() and (run / 'untrained.pth.tar').is_file()
    result = {'bbox': {'AP': 0.25}, 'segm': {'AP': 0.3}}
    assert demo_det.not_learned(result, result) is None
    low = demo_det.not_learned({'bbox': {'AP': 0.5}, 'segm': {'AP': 0.249}}, {'bbox': {'AP': 0.0}, 'segm': {'AP': 0.0}})
    assert low.startswith('demo_det.py: the detector did not learn: mask AP 24.9 (untrained 0.0), below the 25')
