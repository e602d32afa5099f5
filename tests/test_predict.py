"""predict.py on a generated labelled folder agrees with validate.py, for a run directory, a
.safetensors file and a MindSpore .ckpt; folders and globs give the same rows; unreadable files are
listed; bad arguments are one line."""
import json
import os

import pytest
import torch
from timm.data import create_transform

import predict
import validate as validate_script
from data import ImageFolderDataset
from tests.mindspore_writer import mindcv_names, write_mindspore_checkpoint
from tests.training_runs import copy_with_unreadable_image, run_fast
from tools import export_weights
import models


@pytest.fixture(scope='module')
def run(shapes, tmp_path_factory):
    """A run directory whose best checkpoint's class head is fitted here (ridge regression on the
    class-token features of the validation images; the token head zeroed), so that the predictions
    vary from image to image: a 1-epoch run predicts one class everywhere, which a wrong row order or
    crop would agree with as well."""
    # volo_d1: the MindSpore .ckpt below needs a VOLO that MindCV has
    run = run_fast(shapes, tmp_path_factory.mktemp('predict_runs'), '--model', 'volo_d1', '--epochs', '1')
    path = os.path.join(run, 'model_best.pth.tar')
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    model = models.volo_d1(img_size=32, num_classes=3)
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    dataset = ImageFolderDataset(os.path.join(shapes, 'val'), transform=create_transform(32, crop_pct=0.96))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    centred = features - features.mean(0)
    targets = torch.nn.functional.one_hot(torch.tensor(dataset.targets), 3).float() - 1 / 3
    weight = torch.linalg.solve(centred.T @ centred + 1e-3 * torch.eye(centred.shape[1]), centred.T @ targets).T
    state = checkpoint['state_dict']
    state['head.weight'], state['head.bias'] = weight, -weight @ features.mean(0)
    state['aux_head.weight'], state['aux_head.bias'] = torch.zeros_like(state['aux_head.weight']), \
        torch.zeros_like(state['aux_head.bias'])
    torch.save(checkpoint, path)
    return run


def _agreement(rows, val_dir, by_index=False):
    """Percent of rows whose top-1 is their folder's class (its name, or its index in sorted order)."""
    classes = sorted(os.listdir(val_dir))
    hits = [(classes.index(os.path.basename(os.path.dirname(r['path']))) if by_index else
             os.path.basename(os.path.dirname(r['path']))) == r['class_1'] for r in rows]
    return 100 * sum(hits) / len(hits)


def test_predictions_agree_with_validate_for_a_run_a_safetensors_and_a_mindspore_file(shapes, run, tmp_path):
    val = os.path.join(shapes, 'val')
    checkpoint = os.path.join(run, 'model_best.pth.tar')
    safetensors = str(tmp_path / 'w.safetensors')
    assert export_weights.main([checkpoint, safetensors]) == 0
    model = models.volo_d1(img_size=32, num_classes=3)
    model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict'])
    ckpt = str(write_mindspore_checkpoint(tmp_path / 'w.ckpt', mindcv_names(model)))
    sources = [(run, [], False), (safetensors, ['--model', 'volo_d1', '--img-size', '32'], False),
               (ckpt, ['--model', 'volo_d1', '--img-size', '32'], True)]
    for source, extra, by_index in sources:
        top1 = validate_script.main([shapes, '--checkpoint', source, *extra, '-b', '5', '-j', '0'])[0]['top1']
        rows = predict.main([val, '--checkpoint', source, *extra, '-b', '5', '-j', '0', '--topk', '3'])
        assert len(rows) == 12 and all(len([k for k in r if k.startswith('class_')]) == 3 for r in rows)
        assert all(1 >= r['prob_1'] >= r['prob_2'] >= r['prob_3'] >= 0 for r in rows)
        assert len({r['class_1'] for r in rows}) == 3 and top1 > 0
        assert _agreement(rows, val, by_index) == pytest.approx(top1, abs=1e-3), source
    assert isinstance(rows[0]['class_1'], int)  # the MindSpore file holds no class names: indices


def test_folders_and_globs_give_the_same_rows_and_files_are_written(shapes, run, tmp_path):
    val = os.path.join(shapes, 'val')
    by_folder = predict.main([val, '--checkpoint', run, '-j', '0', '--results-file', str(tmp_path / 'p.json')])
    by_glob = predict.main([os.path.join(val, '**', '*.png'), '--checkpoint', run, '-j', '0',
                            '--results-file', str(tmp_path / 'p.csv')])
    assert by_folder == by_glob
    assert json.loads((tmp_path / 'p.json').read_text()) == by_folder
    lines = (tmp_path / 'p.csv').read_text().splitlines()
    assert len(lines) == 13 and lines[0].startswith('path,class_1,index_1,prob_1')
    one = by_folder[0]['path']
    again = predict.main([one, val, '--checkpoint', run, '-j', '0'])  # a file named twice is predicted once
    assert [r['path'] for r in again] == [one] + [r['path'] for r in by_folder if r['path'] != one]


def test_unreadable_files_are_listed_and_skipped(shapes, run, tmp_path, capsys):
    root, victim = copy_with_unreadable_image(shapes, tmp_path / 'copy', 'val', index=2)
    with pytest.raises(SystemExit) as exit_info:
        predict.cli([str(root / 'val'), '--checkpoint', run, '-j', '0', '-b', '4', '--results-file',
                     str(tmp_path / 'rows.json')])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f'unreadable, skipped: {victim}' in err and '1 of 12 images could not be read' in err
    rows = json.loads((tmp_path / 'rows.json').read_text())
    assert len(rows) == 11 and str(victim) not in {r['path'] for r in rows}


@pytest.mark.parametrize('argv, message', [
    (['nowhere/', '--checkpoint', 'x'], 'nowhere/: no such file or folder'),
    (['{shapes}/val/*.jpeg', '--checkpoint', 'x'], 'no images'),
    (['{shapes}/val'], 'give --checkpoint FILE_OR_RUN'),
    (['{shapes}/val', '--checkpoint', '{run}', '--results-file', 'x.txt'], 'use a .csv or .json name'),
])
def test_bad_arguments_are_one_line(shapes, run, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        predict.cli([a.format(shapes=shapes, run=run) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and message in err.strip().splitlines()[-1], err
