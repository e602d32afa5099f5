"""Every recipe in configs/ trains: each YAML file is read by its trainer and trains two steps on
generated data (and evaluates), with only the model's size and the image size brought down to a
test's (the small test model; for segmentation and detection the smallest backbone of the family
and narrow heads) and the data's scale (batch, epochs or iterations, workers, output). Every option a recipe names
must exist: a misspelt key stops the trainer with one line naming the file and the key."""
import glob
import os

import pytest

import main as train_script
import train_det
import train_seg
from data.synthetic_seg import make_seg_dataset
from engine.summary import read_summary
from tests.test_det_training import coco  # noqa: F401  (the generated COCO set)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipes(*folders):
    return sorted(os.path.relpath(path, REPO) for folder in folders
                  for path in glob.glob(os.path.join(REPO, 'configs', folder, '*.yaml')))


@pytest.fixture(scope='module')
def seg_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp('seg_sets')
    return {layout: make_seg_dataset(str(root / layout), layout, num_classes=5, train=4, val=2, size=(48, 64))
            for layout in ('ade20k', 'cityscapes', 'seg-folder')}


@pytest.mark.parametrize('config', recipes('', 'visformer'))
def test_classification_recipe_trains_two_steps(shapes, tmp_path, config):
    run = train_script.main([shapes, '-c', os.path.join(REPO, config), '--model', 'volo_test', '--img-size', '32',
                             '-b', '12', '--epochs', '1', '-j', '0', '--output', str(tmp_path)])
    [row] = read_summary(os.path.join(run, 'summary.csv'))
    assert float(row['train_loss']) > 0 and row['eval_top1'] != ''
    assert 'Train: 0 [   1/2' in open(os.path.join(run, 'train.log')).read()  # the second of two steps


@pytest.mark.parametrize('config', recipes('seg'))
def test_segmentation_recipe_trains_two_steps(seg_sets, tmp_path, config):
    args = train_seg.parse_args(['/d', '-c', os.path.join(REPO, config)])
    run = train_seg.main([seg_sets[args.dataset], '-c', os.path.join(REPO, config), '--model', 'volo_d1',
                          '--crop-size', '32', '32', '--img-scale', '64', '32', '--test-scale', '64', '32',
                          '--eval-stride', '21', '21', '--head-channels', '32', '--aux-channels', '16', '-b', '2',
                          '--iters', '2', '-j', '0', '--output', str(tmp_path)])
    [row] = read_summary(os.path.join(run, 'summary.csv'))
    assert row['iteration'] == '2' and row['eval_mIoU'] != ''


@pytest.mark.parametrize('config', recipes('det'))
def test_detection_recipe_trains_two_steps(coco, tmp_path, config):  # noqa: F811
    backbone = 'visformer_tiny' if 'visformer' in config else 'volo_d1'
    run = train_det.main([coco, '-c', os.path.join(REPO, config), '--model', backbone, '--no-multi-scale',
                          '--fpn-channels', '32', '--train-sizes', '64', '--test-size', '64', '--max-size', '96',
                          '--epochs', '1',
                          '--lr-steps', '-b', '2', '-j', '0', '--eval-batch-size', '2', '--output', str(tmp_path)])
    [row] = read_summary(os.path.join(run, 'summary.csv'))
    assert float(row['train_loss']) > 0 and row['eval_bbox_AP'] != ''


def test_a_misspelt_recipe_key_is_one_line(tmp_path, capsys):
    config = tmp_path / 'recipe.yaml'
    config.write_text(open(os.path.join(REPO, 'configs', 'volo_d1_224.yaml')).read() + 'warmup_epoch: 3\n')
    with pytest.raises(SystemExit) as stopped:
        train_script.parse_args(['/d', '-c', str(config)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(config) in error and 'warmup_epoch' in error
