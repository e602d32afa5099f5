"""train_seg.py and validate_seg.py end to end on generated ADE20K-, Cityscapes- and folder-layout
datasets: training, resume, evaluation, saved predictions re-scored here, and every bad input a
clear error."""
import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import predict
import train_seg
import validate_seg
from data import ADE20K_CLASSES, SegEvalTransform, build_seg_dataset
from tools import cityscapes_train_ids
from data.synthetic_seg import make_seg_dataset
from engine.summary import read_summary
from tests.forked import run_ranks
from utils import seg_inference
from utils.cli import UsageError
from utils.seg_inference import AUG_TEST_RATIOS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--model', 'volo_d1', '--crop-size', '32', '32', '-b', '2', '--warmup-iters', '1', '-j', '0',
        '--log-interval', '1', '--head-channels', '32', '--aux-channels', '16', '--drop-path', '0']


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    return make_seg_dataset(str(tmp_path_factory.mktemp('ade')), 'ade20k', num_classes=5, train=6, val=3,
                            size=[(48, 64), (64, 48), (40, 56)])


@pytest.fixture(scope='module')
def cityscapes(tmp_path_factory):
    return make_seg_dataset(str(tmp_path_factory.mktemp('cityscapes')), 'cityscapes', num_classes=6, train=4, val=2,
                            size=(48, 96))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_seg_dataset(str(tmp_path_factory.mktemp('folder')), 'folder', num_classes=4, train=4, val=2,
                            size=(48, 48))


def _rescore(pred_dir, dataset_root, num_classes, reduce_zero_label, label_glob):
    """mIoU (percent) of saved prediction PNGs against the dataset's label PNGs, written out here
    with a confusion matrix."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    labels = sorted(glob.glob(os.path.join(dataset_root, label_glob)))
    assert labels
    for label_path in labels:
        stem = os.path.splitext(os.path.basename(label_path))[0]
        pred = np.array(Image.open(os.path.join(pred_dir, stem + '.png'))).astype(np.int64)
        label = np.array(Image.open(label_path)).astype(np.int64)
        assert pred.shape == label.shape
        if reduce_zero_label:
            assert pred.min() >= 1  # saved in the dataset's own space: +1
            pred, label = pred - 1, np.where(label == 0, 255, label - 1)
        keep = label != 255
        np.add.at(conf, (label[keep], pred[keep]), 1)
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    return 100 * np.mean(inter[union > 0] / union[union > 0])


def test_ade20k_train_resume_validate_and_rescore(ade, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / 'out'
    run = train_seg.main([ade, '--dataset', 'ade20k', *FAST, '--iters', '4', '--eval-interval', '2',
                          '--eval-mode', 'whole', '--test-scale', '64', '48', '--output', str(out)])
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [int(r['iteration']) for r in rows] == [2, 4] and all('eval_mIoU' in r for r in rows)
    best = json.load(open(os.path.join(run, 'best.json')))
    assert best['mIoU'] == pytest.approx(max(float(r['eval_mIoU']) for r in rows))
    assert os.path.isfile(os.path.join(run, 'model_best.pth.tar')) and os.path.isfile(os.path.join(run, 'train.log'))
    # the checkpoint holds a segmentor with mmseg-named heads and the 150 ADE20K classes
    state = torch.load(os.path.join(run, 'last.pth.tar'), weights_only=False)['state_dict']
    assert state['decode_head.conv_seg.weight'].shape[0] == 150 and 'auxiliary_head.convs.0.conv.weight' in state
    optimizer_step = torch.load(os.path.join(run, 'last.pth.tar'), weights_only=False)['optimizer']['state'][0]['step']

    caplog.clear()
    run2 = train_seg.main([ade, '--dataset', 'ade20k', *FAST, '--iters', '6', '--eval-interval', '2',
                           '--eval-mode', 'whole', '--test-scale', '64', '48', '--output', str(out), '--resume', 'auto'])
    assert run2 == run
    assert 'continuing at iteration 4' in caplog.text
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [int(r['iteration']) for r in rows] == [2, 4, 6]
    resumed = torch.load(os.path.join(run, 'last.pth.tar'), weights_only=False)
    assert resumed['iteration'] == 6 and 'epoch' not in resumed and float(resumed['optimizer']['state'][0]['step']) == float(optimizer_step) + 2

    results_file = tmp_path / 'results.json'
    results = validate_seg.main([ade, '--checkpoint', run, '--mode', 'slide', '--crop-size', '32', '32',
                                 '--stride', '16', '16', '--test-scale', '64', '48', '-j', '0',
                                 '--save-predictions', str(tmp_path / 'pred'), '--results-file', str(results_file)])
    saved = json.load(open(results_file))
    assert set(saved) >= {'mIoU', 'mAcc', 'aAcc', 'per_class'} and len(saved['per_class']) == 150
    assert saved['mIoU'] == pytest.approx(results['mIoU'])
    assert _rescore(tmp_path / 'pred', ade, 150, True, 'annotations/validation/*.png') == pytest.approx(results['mIoU'])

    # predict.py on the same images, without their labels: the same maps, and rows that say what the maps hold
    rows = predict.main([os.path.join(ade, 'images', 'validation'), '--checkpoint', run, '--crop-size', '32', '32',
                         '--stride', '16', '16', '--test-scale', '64', '48', '-j', '0', '--topk', '2',
                         '--save-predictions', str(tmp_path / 'predicted'), '--save-overlays', str(tmp_path / 'over')])
    assert sorted(os.listdir(tmp_path / 'predicted')) == sorted(os.listdir(tmp_path / 'pred')) == \
        sorted(os.listdir(tmp_path / 'over')) and len(rows) == 3
    for row in rows:
        name = os.path.splitext(os.path.basename(row['path']))[0] + '.png'
        predicted = np.array(Image.open(tmp_path / 'predicted' / name))
        np.testing.assert_array_equal(predicted, np.array(Image.open(tmp_path / 'pred' / name)))
        counts = np.bincount(predicted.ravel() - 1, minlength=150)
        assert row['index_1'] == int(counts.argmax()) and row['area_1'] == pytest.approx(counts.max() / counts.sum())
        assert row['class_1'] == ADE20K_CLASSES[row['index_1']] and row['area_1'] >= row['area_2']
        assert Image.open(tmp_path / 'over' / name).size == predicted.shape[::-1]

    # a saved prediction is the model's argmax at the label's size, +1 (ADE20K's own label space)
    validate_seg.main([ade, '--checkpoint', run, '--mode', 'whole', '--test-scale', '64', '48', '-j', '0',
                       '--save-predictions', str(tmp_path / 'whole')])
    from data import SegEvalTransform, build_seg_dataset
    from models.segmentation import build_segmentor
    from utils import load_pretrained_weights
    model = build_segmentor('volo_d1', 150, img_size=32, head_channels=32, aux_channels=16).eval()
    load_pretrained_weights(model, os.path.join(run, 'model_best.pth.tar'))
    dataset = build_seg_dataset('ade20k', ade, 'val', SegEvalTransform((64, 48)))
    for i in range(len(dataset)):
        image, label, _ = dataset[i]
        h, w = image.shape[1:]
        padded = torch.nn.functional.pad(image[None], (0, -w % 16, 0, -h % 16))  # bottom/right to multiples of 16
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(padded)[:, :, :h, :w], size=label.shape, mode='bilinear',
                                                     align_corners=False)
        saved = np.array(Image.open(tmp_path / 'whole' / os.path.basename(dataset.pairs[i][1])))
        np.testing.assert_array_equal(saved, logits.argmax(1)[0].numpy() + 1)


def test_cityscapes_train_then_slide_validate_with_overlays(cityscapes, tmp_path):
    run = train_seg.main([cityscapes, '--dataset', 'cityscapes', *FAST, '--iters', '2', '--eval-interval', '0',
                          '--test-scale', '96', '48', '--output', str(tmp_path / 'out')])
    assert os.path.isfile(os.path.join(run, 'model_best.pth.tar'))
    results = validate_seg.main([cityscapes, '--checkpoint', os.path.join(run, 'last.pth.tar'), '--test-scale', '96', '48',
                                 '--save-predictions', str(tmp_path / 'pred'), '--save-overlays', str(tmp_path / 'ov'),
                                 '-j', '0'])
    assert results['dataset'] == 'cityscapes' and results['crop_size'] == [32, 32] and results['stride'] == [22, 22]
    assert _rescore(tmp_path / 'pred', cityscapes, 19, False, 'gtFine/val/*/*_labelTrainIds.png') == \
        pytest.approx(results['mIoU'])
    overlays = sorted(glob.glob(str(tmp_path / 'ov' / '*.png')))
    assert len(overlays) == 2 and Image.open(overlays[0]).size == (96, 48) and Image.open(overlays[0]).mode == 'RGB'


def test_aug_test_runs_every_scale_and_flip(folder, tmp_path, monkeypatch):
    run = train_seg.main([folder, '--dataset', 'folder', *FAST, '--iters', '1', '--eval-interval', '0',
                          '--output', str(tmp_path / 'out')])  # --warmup-iters 1 of 1: none, with a warning
    built, inputs, scores = [], [], []  # the segmentor validate_seg.py builds, every input it runs on, the scores
    real_build, real_scores = validate_seg.build_from_checkpoint, seg_inference.predict_scores

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
        built.append(model)
        return model

    monkeypatch.setattr(validate_seg, 'build_from_checkpoint', build)
    monkeypatch.setattr(seg_inference, 'predict_scores', lambda *a, **k: scores.append(real_scores(*a, **k)) or
                        scores[-1])
    plain = validate_seg.main([folder, '--checkpoint', run, '--mode', 'whole', '-j', '0'])
    plain_inputs, plain_scores = inputs[:], scores[:]
    inputs.clear()
    scores.clear()
    tta = validate_seg.main([folder, '--checkpoint', run, '--mode', 'whole', '--aug-test', '-j', '0'])
    monkeypatch.undo()
    assert plain['images'] == tta['images'] == 2 and tta['aug_test'] and [r['class'] for r in tta['per_class']] == \
        ['background', 'ellipse', 'rectangle', 'triangle']
    # every scale ratio of utils/seg_inference.py and its horizontal flip, written out here: the image resized
    # (mmseg's int(side * ratio + 0.5)), flipped or not, padded at the bottom and right to VOLO's stride 16;
    # the scores: each pass's logits cropped, flipped back, resized to the label, softmax, averaged
    model = built[-1].eval()
    dataset = build_seg_dataset('seg-folder', folder, 'val', SegEvalTransform(None))
    per_image = 2 * len(AUG_TEST_RATIOS)  # forward passes per image
    assert (len(plain_inputs), len(inputs)) == (len(dataset), len(dataset) * per_image)
    for i in range(len(dataset)):
        image, label, _ = dataset[i]
        image, (h, w) = image[None], image.shape[1:]
        assert torch.equal(plain_inputs[i], image)  # 48x48: no padding
        expected, total = [], torch.zeros(1, 4, *label.shape)
        for ratio in AUG_TEST_RATIOS:
            size = (int(h * ratio + 0.5), int(w * ratio + 0.5))
            scaled = F.interpolate(image, size=size, mode='bilinear', align_corners=False)
            for flipped in (False, True):
                x = F.pad(scaled.flip(3) if flipped else scaled, (0, -size[1] % 16, 0, -size[0] % 16))
                expected.append(((ratio, flipped), x))
                with torch.no_grad():
                    logits = model(x)[:, :, :size[0], :size[1]]
                logits = logits.flip(3) if flipped else logits
                total += F.interpolate(logits, size=tuple(label.shape), mode='bilinear', align_corners=False).softmax(1)
        ran = inputs[i * per_image:(i + 1) * per_image]
        matched = [next((k for k, (_, x) in enumerate(expected) if x.shape == got.shape and
                         torch.allclose(x, got, atol=1e-5)), None) for got in ran]
        assert None not in matched and sorted(matched) == list(range(per_image)), \
            [expected[k][0] if k is not None else tuple(got.shape) for k, got in zip(matched, ran)]  # each pass once
        torch.testing.assert_close(scores[i], total / per_image, rtol=1e-4, atol=1e-5)
        assert (scores[i] - plain_scores[i]).abs().max() > 1e-3  # the average is not the plain pass
    labels = os.path.join(folder, 'labels', 'val')  # predictions named as the labels: into their folder, a clash
    before = {name: open(os.path.join(labels, name), 'rb').read() for name in os.listdir(labels)}
    with pytest.raises(UsageError, match=rf'--save-predictions {labels} would write over the label {labels}'):
        validate_seg.main([folder, '--checkpoint', run, '--mode', 'whole', '-j', '0', '--save-predictions', labels])
    with pytest.raises(UsageError, match='--save-overlays .* and --save-predictions .* would both write'):
        validate_seg.main([folder, '--checkpoint', run, '--mode', 'whole', '-j', '0', '--save-predictions',
                           str(tmp_path / 'p'), '--save-overlays', str(tmp_path / 'p')])
    assert before == {name: open(os.path.join(labels, name), 'rb').read() for name in os.listdir(labels)}


def test_cityscapes_train_ids_tool(cityscapes, tmp_path, capsys):
    root = tmp_path / 'cs'
    shutil.copytree(cityscapes, root)
    expected = {p: np.array(Image.open(p)) for p in glob.glob(str(root / 'gtFine' / '*' / '*' / '*_labelTrainIds.png'))}
    for p in expected:
        os.remove(p)
    # before the tool: a clear error that says to run it
    with pytest.raises(SystemExit) as e:
        train_seg.cli([str(root), '--dataset', 'cityscapes', *FAST, '--iters', '1', '--output', str(tmp_path / 'o')])
    assert e.value.code == 2
    edited = glob.glob(str(root / 'gtFine' / 'val' / '*' / '*_labelIds.png'))[0]
    ids = np.array(Image.open(edited))
    ids[0, :6] = (0, 1, 7, 33, 34, 255)  # unlabeled, ego vehicle, road, bicycle, beyond the 19, out of range
    Image.fromarray(ids).save(edited)
    assert cityscapes_train_ids.main([str(root)]) == 0  # in this process: tests/test_structure.py runs tools as modules
    assert f'{len(expected)} written' in capsys.readouterr().out
    for path, original in expected.items():
        written = np.array(Image.open(path))
        if path == edited.replace('_labelIds', '_labelTrainIds'):
            assert written[0, :6].tolist() == [255, 255, 0, 18, 255, 255]
            written, original = written[1:], original[1:]
        np.testing.assert_array_equal(written, original)  # the generator's train ids, recovered from labelIds
    assert cityscapes_train_ids.main([str(root)]) == 0
    assert f'0 written, {len(expected)} already present' in capsys.readouterr().out


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    return edit(dst)


@pytest.mark.parametrize('problem', ['missing_folder', 'image_without_label', 'label_other_size',
                                     'label_out_of_range', 'label_rgb', 'no_classes_file'])
def test_bad_datasets_are_clear_errors(folder, tmp_path, caplog, problem):
    root = tmp_path / 'data'
    shutil.copytree(folder, root)
    label = root / 'labels' / 'train' / 'train_0001.png'
    if problem == 'missing_folder':
        shutil.rmtree(root / 'labels' / 'train')
        expected = str(root / 'labels' / 'train')
    elif problem == 'image_without_label':
        os.remove(label)
        expected = f'{root / "images" / "train" / "train_0001.png"} has no label'
    elif problem == 'label_other_size':
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(label)
        expected = f'{label} is 48x40 but its image'
    elif problem == 'label_out_of_range':
        values = np.array(Image.open(label))
        values[3, 3] = 9
        Image.fromarray(values).save(label)
        expected = f'{label}: label values [9] are outside the 4 classes'
    elif problem == 'label_rgb':
        Image.new('RGB', (48, 48)).save(label)
        expected = f'{label}: a label must be a single-channel index PNG'
    else:
        os.remove(root / 'classes.txt')
        expected = 'classes.txt not found'
    argv = [str(root), '--dataset', 'folder', *FAST, '--iters', '4', '--eval-interval', '0',
            '--output', str(tmp_path / 'out')]
    if problem == 'label_out_of_range':  # raised in a loader worker: the message, not the worker's traceback
        argv += ['-j', '1']
    with pytest.raises(SystemExit) as e:
        train_seg.cli(argv)
    assert e.value.code == 2
    assert expected in caplog.text
    assert 'Traceback' not in caplog.text


@pytest.mark.parametrize('args,message', [
    (['--eval-stride', '0', '16'], 'argument --eval-stride: expected a positive integer, got 0'),
    (['-b', '1'], '-b 1: the 1x1 pyramid-pooling level of UPerHead has one value per channel'),
    (['--eval-stride', '40', '16'], 'stride 40x16 must be between 1 and the crop size 32x32'),
    (['--crop-size', '30', '32'], 'crop size 30x32: both sides must be positive multiples of 16'),
    (['--dataset', 'coco'], "invalid choice: 'coco'"),
])
def test_bad_training_arguments_are_clear_errors(folder, tmp_path, caplog, capsys, args, message):
    argv = [folder, '--dataset', 'folder', *FAST, '--iters', '4', '--output', str(tmp_path), *args]
    with pytest.raises(SystemExit) as e:
        train_seg.cli(argv)
    assert e.value.code == 2
    assert message in caplog.text + capsys.readouterr().err
    assert not glob.glob(str(tmp_path / 'train_seg' / '*' / '*.pth.tar'))


def test_bad_validation_arguments_are_clear_errors(folder, ade, tmp_path, caplog, capsys):
    run = train_seg.main([folder, '--dataset', 'folder', *FAST, '--iters', '1', '--eval-interval', '0',
                          '--output', str(tmp_path / 'out')])
    cases = [(['--stride', '0', '8'], 'argument --stride: expected a positive integer, got 0'),
             (['--stride', '33', '8'], 'must be between 1 and the crop size'),
             (['--crop-size', '24', '24'], 'multiples of 16'),
             (['--dataset', 'pascal'], "invalid choice: 'pascal'")]
    for args, message in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as e:
            validate_seg.cli([folder, '--checkpoint', run, '-j', '0', *args])
        assert e.value.code == 2
        assert message in caplog.text + capsys.readouterr().err, args
    caplog.clear()
    with pytest.raises(SystemExit):  # a 4-class checkpoint on the 150-class ADE20K layout
        validate_seg.cli([ade, '--dataset', 'ade20k', '--checkpoint', run, '-j', '0'])
    assert 'predicts 4 classes, but the ade20k dataset' in caplog.text
    caplog.clear()
    with pytest.raises(SystemExit):  # a classification checkpoint
        import models
        torch.save(models.volo_d1(img_size=32).state_dict(), tmp_path / 'cls.pth')
        validate_seg.cli([folder, '--checkpoint', str(tmp_path / 'cls.pth'), '--model', 'volo_d1',
                          '--dataset', 'folder', '-j', '0'])
    assert 'not a segmentor checkpoint' in caplog.text


def test_two_processes_train_and_evaluate(folder, tmp_path):
    """train_seg.py as two ranks (tests/forked.py: what torchrun gives each process)."""
    argv = [folder, '--dataset', 'folder', *FAST, '--iters', '2', '--eval-interval', '2', '--output', str(tmp_path)]
    ranks = run_ranks(lambda: train_seg.cli(argv), tmp_path / 'logs')
    assert [code for code, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    assert 'Process 1 of 2 on cpu' in ranks[1][1] and 'Evaluation at iteration 2 (2 images' in ranks[0][1]
    assert len(glob.glob(str(tmp_path / 'train_seg' / '*' / 'model_best.pth.tar'))) == 1


@pytest.mark.parametrize('config', sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'configs', 'seg', '*.yaml'))))
def test_segmentation_recipes_parse_and_match_the_reference(config):
    args = train_seg.parse_args(['/data', '-c', os.path.join(REPO, 'configs', 'seg', config)])
    if config == 'demo.yaml':
        assert args.dataset == 'seg-folder' and args.model == 'volo_d1' and args.img_scale == [96, 64]
        return
    # segmentation.md §2: AdamW 6e-5, betas (0.9, 0.999), wd 0.01, poly power 1, 1500 warmup from 1e-6, 2 per GPU
    assert (args.lr, args.betas, args.weight_decay, args.power) == (6e-5, [0.9, 0.999], 0.01, 1.0)
    assert (args.warmup_iters, args.warmup_ratio, args.batch_size, args.amp) == (1500, 1e-6, 2, True)
    assert (args.head_channels, args.aux_channels, args.aux_weight, args.cat_max_ratio) == (512, 256, 0.4, 0.75)
    assert args.model == config.split('_')[1] + '_' + config.split('_')[2]
    if args.dataset == 'ade20k':
        assert (args.crop_size, args.img_scale, args.iters, args.eval_stride) == ([512, 512], [2048, 512], 160000, [341, 341])
    else:
        assert args.dataset == 'cityscapes'
        assert (args.crop_size, args.img_scale, args.eval_stride) == ([1024, 1024], [2048, 1024], [768, 768])
