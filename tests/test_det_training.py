"""train_det.py and validate_det.py end to end on a generated COCO-format dataset: training, resume,
evaluation, the saved results re-scored by pycocotools directly, overlays, multi-process gathering,
the recipes, the sampler and the schedule, and bad input as one line."""
import copy
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import predict
import train_det
import validate_det
from inference.overlays import OVERLAY_MIN_SIDE, blend_masks
from data.coco import AspectRatioBatchSampler, CocoInstances
from data.synthetic_det import make_coco_dataset
from engine.summary import read_summary
from models.detection import build_detector, detector_settings, position_grid_size
from tests.forked import run_ranks
from utils.det_metrics import COCO_STAT_NAMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--model', 'volo_d1', '--fpn-channels', '16', '--train-sizes', '64', '80', '--test-size', '64',
        '--max-size', '100', '-b', '2', '--warmup-iters', '2', '-j', '0', '--log-interval', '1', '--drop-path', '0',
        '--eval-batch-size', '2']


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return make_coco_dataset(str(tmp_path_factory.mktemp('coco')), train=6, val=4, seed=1)


@pytest.fixture(scope='module')
def trained(coco, tmp_path_factory):
    """A run of 1 epoch, then --resume auto to 2 epochs (one process, evaluation after each)."""
    output = str(tmp_path_factory.mktemp('runs'))
    run = train_det.main([coco, *FAST, '--epochs', '1', '--lr-steps', '--output', output])
    resumed = train_det.main([coco, *FAST, '--epochs', '2', '--lr-steps', '--output', output, '--resume', 'auto'])
    return run, resumed


def test_generated_dataset_has_every_annotation_form(coco):
    data = json.load(open(os.path.join(coco, 'annotations', 'instances_train2017.json')))
    anns = data['annotations']
    assert sorted(c['id'] for c in data['categories']) == [3, 7, 12]  # ids with gaps
    assert any(isinstance(a['segmentation'], list) for a in anns)
    rles = [a['segmentation'] for a in anns if isinstance(a['segmentation'], dict)]
    assert any(isinstance(r['counts'], str) for r in rles) and any(isinstance(r['counts'], list) for r in rles)
    assert sum(a['iscrowd'] for a in anns) == 1
    assert len({a['image_id'] for a in anns}) == len(data['images']) - 1  # one empty image
    shapes = {(i['width'] >= i['height']) for i in data['images']}
    assert shapes == {True, False}
    dataset = CocoInstances(os.path.join(coco, 'train2017'), os.path.join(coco, 'annotations',
                                                                          'instances_train2017.json'), train=True)
    assert len(dataset) == len(data['images']) - 1  # training leaves the empty image out
    for index in range(len(dataset)):
        _, target = dataset[index]
        assert target['masks'].shape[0] == len(target['labels']) == target['boxes'].shape[0]
        assert not target['iscrowd'].any()


def test_train_resume_and_validate_agree_with_pycocotools(coco, trained, tmp_path):
    run, resumed = trained
    assert resumed == run  # --resume auto continued the same run directory
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert all(r['eval_bbox_AP'] != '' and r['eval_segm_AP'] != '' for r in rows)
    assert json.load(open(os.path.join(run, 'best.json')))['epoch'] in (0, 1)
    checkpoint = torch.load(os.path.join(run, 'last.pth.tar'), map_location='cpu', weights_only=False)
    assert checkpoint['label_to_category'] == [0, 3, 7, 12] and checkpoint['class_names'] == ['square', 'disc',
                                                                                              'diamond']
    assert detector_settings(checkpoint['state_dict']) == {'kind': 'mask_rcnn', 'num_classes': 3, 'fpn_channels': 16}

    detections, metrics_file, overlays = tmp_path / 'det.json', tmp_path / 'metrics.json', tmp_path / 'overlays'
    metrics = validate_det.main([coco, '--checkpoint', run, '-j', '0', '--results-file', str(metrics_file),
                                 '--save-results', str(detections), '--save-overlays', str(overlays),
                                 '--overlay-threshold', '0'])
    assert metrics['test_size'] == 64 and metrics['max_size'] == 100 and metrics['model'] == 'volo_d1'
    assert json.load(open(metrics_file))['bbox'] == metrics['bbox']
    results = json.load(open(detections))
    assert results and {r['category_id'] for r in results} <= {3, 7, 12}
    assert all(isinstance(r['segmentation']['counts'], str) for r in results)
    gt = COCO(os.path.join(coco, 'annotations', 'instances_val2017.json'))
    assert {r['image_id'] for r in results} <= set(gt.getImgIds())
    for kind in ('bbox', 'segm'):  # pycocotools on the saved file, run here: the same numbers to the last digit
        evaluation = COCOeval(gt, gt.loadRes(str(detections)), kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert [metrics[kind][name] for name in COCO_STAT_NAMES] == [float(v) for v in evaluation.stats]
    drawn = sorted(os.listdir(overlays))
    assert drawn == sorted(os.path.splitext(i['file_name'])[0] + '.png' for i in gt.dataset['images'])
    changed = 0
    for name in drawn:
        info = next(i for i in gt.dataset['images'] if i['file_name'].startswith(name[:-4]))
        factor = -(-OVERLAY_MIN_SIDE // min(info['width'], info['height']))  # small images enlarged
        with Image.open(os.path.join(coco, 'val2017', info['file_name'])) as source, Image.open(overlays / name) as image:
            assert image.size == (info['width'] * factor, info['height'] * factor)
            plain = source.convert('RGB').resize(image.size, Image.NEAREST)
            changed += bool((np.asarray(image, dtype=int) != np.asarray(plain, dtype=int)).any())
    assert changed == len({r['image_id'] for r in results if r['score'] >= 0})  # every image with detections drawn on


def test_the_trained_detector_scores_what_its_detections_say(coco, trained, tmp_path):
    """The metrics of --results-file equal COCOeval over the detections the model makes here."""
    run, _ = trained
    checkpoint = torch.load(os.path.join(run, 'model_best.pth.tar'), map_location='cpu', weights_only=False)
    model = build_detector('volo_d1', 3, min_size=64, max_size=100, fpn_channels=16,
                           img_size=position_grid_size('volo_d1', 64, 100))
    assert position_grid_size('volo_d1', 64, 100) == (64, 128)
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    dataset = CocoInstances(os.path.join(coco, 'val2017'), os.path.join(coco, 'annotations',
                                                                        'instances_val2017.json'), with_masks=False)
    results = []
    with torch.no_grad():
        for index in range(len(dataset)):
            image, target = dataset[index]
            output = model([image])[0]
            for box, score, label in zip(output['boxes'].tolist(), output['scores'].tolist(),
                                         output['labels'].tolist()):
                results.append({'image_id': target['image_id'], 'category_id': [0, 3, 7, 12][label],
                                'bbox': [round(box[0], 3), round(box[1], 3), round(box[2] - box[0], 3),
                                         round(box[3] - box[1], 3)], 'score': round(score, 5)})
    metrics = validate_det.main([coco, '--checkpoint', os.path.join(run, 'model_best.pth.tar'), '-j', '0', '-b', '1'])
    evaluation = COCOeval(dataset.coco, dataset.coco.loadRes(results), 'bbox')
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert [metrics['bbox'][n] for n in COCO_STAT_NAMES] == pytest.approx([float(v) for v in evaluation.stats],
                                                                          abs=1e-9)


def test_predict_finds_what_validate_det_finds_and_writes_a_coco_dataset(coco, trained, tmp_path, capsys):
    """predict.py on the validation images alone: every detection validate_det.py saves, in a file
    pycocotools reads as a dataset (file names, categories, scored annotations), rows and overlays."""
    run, _ = trained
    validate_det.main([coco, '--checkpoint', run, '-j', '0', '--save-results', str(tmp_path / 'val.json')])
    rows = predict.main([os.path.join(coco, 'val2017'), '--checkpoint', run, '-j', '0', '--score-threshold', '0',
                         '--topk', '3', '--save-results', str(tmp_path / 'found.json'), '--save-overlays',
                         str(tmp_path / 'over'), '--results-file', str(tmp_path / 'rows.csv')])
    gt = COCO(os.path.join(coco, 'annotations', 'instances_val2017.json'))
    found = COCO(str(tmp_path / 'found.json'))
    assert sorted(i['file_name'] for i in found.dataset['images']) == sorted(i['file_name'] for i in gt.dataset['images'])
    assert all((i['width'], i['height']) == (gt.imgs[gt_id]['width'], gt.imgs[gt_id]['height'])
               for gt_id, i in zip(sorted(gt.imgs, key=lambda k: gt.imgs[k]['file_name']),
                                   sorted(found.dataset['images'], key=lambda i: i['file_name'])))
    assert {c['id']: c['name'] for c in found.dataset['categories']} == {3: 'square', 7: 'disc', 12: 'diamond'}

    def keyed(results, images):
        return sorted((images[r['image_id']]['file_name'], r['category_id'], r['bbox'], r['score'],
                       r['segmentation']['counts']) for r in results)
    validated = json.load(open(tmp_path / 'val.json'))
    assert validated and keyed(found.dataset['annotations'], found.imgs) == keyed(validated, gt.imgs)
    assert len({a['id'] for a in found.dataset['annotations']}) == len(validated)
    by_file = {os.path.basename(r['path']): r for r in rows}
    for info in found.dataset['images']:
        scores = sorted((a['score'] for a in found.imgToAnns[info['id']]), reverse=True)
        row = by_file[info['file_name']]
        assert row['detections'] == len(scores)  # threshold 0: every detection counts
        assert [row.get(f'score_{k}') for k in (1, 2, 3)] == (scores[:3] + [None] * 3)[:3]
        assert row.get('class_1') in (None, 'square', 'disc', 'diamond')
    assert len((tmp_path / 'rows.csv').read_text().splitlines()) == 5
    assert sorted(os.listdir(tmp_path / 'over')) == sorted(os.path.splitext(n)[0] + '.png' for n in by_file)

    for argv, message in ((['--task', 'seg'], '--task seg: ' + os.path.join(run, 'model_best.pth.tar') + ' holds a '
                                                                            'detector (--task det)'),
                          (['--save-predictions', str(tmp_path / 'p')], '--save-predictions is for seg models'),
                          (['--mean', '0.5', '0.5', '0.5'], '--mean is for classify models'),
                          (['--interpolation', 'bilinear'], '--interpolation is for classify models'),
                          (['--channels-last'], '--channels-last is for classify models')):
        with pytest.raises(SystemExit) as exit_info:
            predict.cli([os.path.join(coco, 'val2017'), '--checkpoint', run, *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_two_process_validation_gathers_every_image_once(coco, trained, tmp_path):
    run, _ = trained
    single = validate_det.main([coco, '--checkpoint', run, '-j', '0', '-b', '1', '--save-results', str(tmp_path / 'one.json')])
    argv = [coco, '--checkpoint', run, '-j', '0', '-b', '1', '--results-file', str(tmp_path / 'two.json'),
            '--save-results', str(tmp_path / 'two_det.json')]
    ranks = run_ranks(lambda: validate_det.cli(argv), tmp_path / 'logs')
    assert [code for code, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    assert 'Process 1 of 2 on cpu' in ranks[1][1]
    two = json.load(open(tmp_path / 'two.json'))
    assert two['images'] == 4 and two['detections'] == single['detections']
    for kind in ('bbox', 'segm'):  # the same numbers (float noise between processes aside)
        assert [two[kind][n] for n in COCO_STAT_NAMES] == pytest.approx([single[kind][n] for n in COCO_STAT_NAMES],
                                                                        abs=1e-3)

    one, two = json.load(open(tmp_path / 'one.json')), json.load(open(tmp_path / 'two_det.json'))
    for image_id in sorted({r['image_id'] for r in one} | {r['image_id'] for r in two}):  # each image once, the same
        scores = [sorted(r['score'] for r in results if r['image_id'] == image_id) for results in (one, two)]
        assert len(scores[0]) == len(scores[1]) and np.allclose(scores[0], scores[1], atol=1e-3), image_id


def test_two_processes_train_and_evaluate(coco, tmp_path):
    """train_det.py as two ranks (tests/forked.py: what torchrun gives each process)."""
    argv = [coco, *FAST, '--epochs', '1', '--lr-steps', '--output', str(tmp_path)]
    ranks = run_ranks(lambda: train_det.cli(argv), tmp_path / 'logs')
    assert [code for code, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    assert 'Process 1 of 2 on cpu' in ranks[1][1] and 'Evaluation after epoch 0 (4 images)' in ranks[0][1]
    assert '2 iterations an epoch' in ranks[0][1]  # 3 wide + 2 tall images: 2 + 1 batches of 2, over 2 processes
    assert len(glob.glob(str(tmp_path / 'train_det' / '*' / 'model_best.pth.tar'))) == 1


class IdModel(nn.Module):
    """A 'detector' whose one detection encodes its image: box at x = image id."""

    def forward(self, images):
        return [{'boxes': torch.tensor([[float(im[0, 0, 0]), 0., float(im[0, 0, 0]) + 1, 1.]]),
                 'scores': torch.tensor([0.9]), 'labels': torch.tensor([1])} for im in images]


def _gather_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    from data.coco import collate_detection
    from utils.det_metrics import evaluate_detection
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    data = [(torch.full((3, 2, 2), float(i)), {'image_id': i}) for i in range(5)]  # 5 images over 2 ranks: one repeated
    sampler = DistributedSampler(data, world_size, rank, shuffle=False)
    loader = DataLoader(data, batch_size=2, sampler=sampler, collate_fn=collate_detection)
    results, ids = evaluate_detection(IdModel(), loader, [0, 1], torch.device('cpu'))
    if rank == 0:
        json.dump({'results': results, 'ids': ids}, open(out_file, 'w'))
    dist.destroy_process_group()


def test_gathering_over_gloo_keeps_each_image_exactly_once(tmp_path):
    """A DistributedSampler pads 5 images to 6 over 2 processes: the gathered results hold each image once."""
    torch.multiprocessing.start_processes(_gather_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'out.json')),
                                          nprocs=2, start_method='fork')
    out = json.load(open(tmp_path / 'out.json'))
    assert out['ids'] == [0, 1, 2, 3, 4]
    assert sorted(r['image_id'] for r in out['results']) == [0, 1, 2, 3, 4]
    assert all(r['bbox'][0] == r['image_id'] for r in out['results'])


def test_aspect_ratio_batches_are_grouped_complete_and_dealt_evenly():
    ratios = [1.5, 0.5, 1.0, 0.7, 2.0, 1.2, 0.6, 1.1, 1.3]  # 6 wide (>= 1), 3 tall
    per_rank = [AspectRatioBatchSampler(ratios, 2, rank, 2, seed=3) for rank in range(2)]
    for epoch in range(3):
        batches = []
        for sampler in per_rank:
            sampler.set_epoch(epoch)
            batches.append(list(sampler))
        assert [len(b) for b in batches] == [len(per_rank[0])] * 2 == [3, 3]  # 3 wide + 2 tall batches, padded to 6
        flat = [batch for rank in batches for batch in rank]
        assert all(len(b) == 2 and len({ratios[i] >= 1 for i in b}) == 1 for b in flat)
        assert set(i for b in flat for i in b) == set(range(len(ratios)))
    sampler = AspectRatioBatchSampler(ratios, 2, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    assert first == list(sampler)  # the same epoch gives the same batches
    sampler.set_epoch(1)
    assert first != list(sampler)


def test_schedule_and_weight_decay_groups():
    args = train_det.parse_args(['/data'])
    assert (args.epochs, args.lr_steps, args.train_sizes) == (12, [8, 11], [800])
    assert train_det.step_lr(0, 0, args) == pytest.approx(1e-7)  # warmup from lr x 0.001
    assert train_det.step_lr(250, 0, args) == pytest.approx(1e-4 * (1 - 0.5 * 0.999))
    assert train_det.step_lr(500, 0, args) == train_det.step_lr(10000, 7, args) == pytest.approx(1e-4)
    assert train_det.step_lr(10000, 8, args) == pytest.approx(1e-5)
    assert train_det.step_lr(10000, 11, args) == pytest.approx(1e-6)
    args3 = train_det.parse_args(['/data', '--schedule', '3x', '--multi-scale'])
    assert (args3.epochs, args3.lr_steps) == (36, [27, 33])
    assert args3.train_sizes == list(range(480, 801, 32)) and len(args3.train_sizes) == 11
    model = build_detector('volo_d1', 2, fpn_channels=16, img_size=(64, 64))
    decay, rest = train_det.param_groups(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in rest['params']}
    assert rest['weight_decay'] == 0 and decay['weight_decay'] == 0.05
    assert 'backbone.body.pos_embed' in no_decay  # (the class token is pruned: the pyramid ends before it)
    norms = {'backbone.body.network.0.0.norm1', 'backbone.body.network.4.1.norm2', 'backbone.neck.levels.0.1'}
    assert {f'{m}.{p}' for m in norms for p in ('weight', 'bias')} <= no_decay  # LayerNorms, the neck's BatchNorm
    assert len(no_decay) == 1 + 2 * 40  # the position embedding, and weight and bias of the 40 norm layers
    assert 'roi_heads.box_head.fc6.bias' in {names[id(p)] for p in decay['params']}
    assert len(decay['params']) + len(rest['params']) == len(list(model.parameters()))


@pytest.mark.parametrize('config', sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'configs', 'det',
                                                                                            '*.yaml'))))
def test_detection_recipes_parse_and_match_the_reference(config):
    args = train_det.parse_args(['/data', '-c', os.path.join(REPO, 'configs', 'det', config)])
    assert args.detector == 'mask_rcnn'
    if config == 'demo.yaml':
        assert args.model == 'volo_d1' and args.fpn_channels == 64
        return
    # detection.md §2: AdamW 1e-4, betas (0.9, 0.999), wd 0.05, 500-iteration warmup from 0.001, 2 per GPU
    assert (args.lr, args.betas, args.weight_decay, args.batch_size) == (1e-4, [0.9, 0.999], 0.05, 2)
    assert (args.warmup_iters, args.warmup_ratio, args.fpn_channels, args.amp) == (500, 0.001, 256, True)
    assert (args.test_size, args.max_size, args.clip_grad) == (800, 1333, None)
    assert args.model == config[len('mask_rcnn_'):-len('_1x.yaml')]
    if config.endswith('_1x.yaml'):
        assert (args.epochs, args.lr_steps, args.train_sizes) == (12, [8, 11], [800])
    else:
        assert (args.epochs, args.lr_steps, args.train_sizes) == (36, [27, 33], list(range(480, 801, 32)))


def _bad_annotations(coco, tmp_path, change):
    data = json.load(open(os.path.join(coco, 'annotations', 'instances_train2017.json')))
    data = copy.deepcopy(data)
    change(data)
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize('problem, message', [
    ('unknown_image', 'annotation 1 refers to image 999, which the file does not list'),
    ('unknown_category', 'annotation 1 refers to category 5, which the file does not list'),
    ('box_outside', 'annotation 1: box [500.0, 0.0, 10.0, 10.0] is outside its image'),
    ('mask_size', 'mask of size [3, 3] for image'),
    ('missing_image', 'is missing'),
])
def test_bad_annotations_are_one_line(coco, tmp_path, capsys, problem, message):
    def change(data):
        ann = next(a for a in data['annotations'] if a['id'] == 1)
        if problem == 'unknown_image':
            ann['image_id'] = 999
        elif problem == 'unknown_category':
            ann['category_id'] = 5
        elif problem == 'box_outside':
            ann['bbox'] = [500.0, 0.0, 10.0, 10.0]
        elif problem == 'mask_size':
            ann['segmentation'] = {'size': [3, 3], 'counts': [9]}
        else:
            data['images'][0]['file_name'] = 'nowhere.jpg'
    bad = _bad_annotations(coco, tmp_path, change)
    with pytest.raises(SystemExit) as exit_info:
        train_det.cli(['--train-ann', bad, '--train-images', os.path.join(coco, 'train2017'), *FAST,
                       '--output', str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('ERROR')]
    assert 'Traceback' not in err and len(errors) == 1 and message in errors[0] and 'bad.json' in errors[0], err


def test_bad_command_lines_are_one_line(coco, trained, tmp_path, capsys):
    run, _ = trained
    cases = [
        (validate_det.cli, [coco, '--checkpoint', run, '--model', 'volo_d2'], 'does not fit the MaskRCNN model'),
        (validate_det.cli, [coco, '--checkpoint', str(tmp_path / 'none.pth')], 'none.pth'),
        (validate_det.cli, [coco, '--checkpoint', run, '--save-results', str(tmp_path / 'x.txt')], 'use a .json name'),
        (train_det.cli, [coco, *FAST, '--epochs', '2', '--lr-steps', '3'], '--lr-steps [3]'),
        (train_det.cli, [*FAST], 'give a COCO root DIR'),
    ]
    torch.save({'state_dict': build_detector('volo_d1', 2, fpn_channels=16, img_size=(64, 64)).backbone.body
                .state_dict()}, tmp_path / 'cls.pth')
    cases.append((validate_det.cli, [coco, '--checkpoint', str(tmp_path / 'cls.pth'), '--model', 'volo_d1'],
                  'holds no detector'))
    for cli, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert 'Traceback' not in err and message in err.strip().splitlines()[-1], (argv, err)


def test_outputs_never_write_over_inputs_or_each_other(coco, trained, tmp_path, capsys):
    """Each clash is one line naming both paths, found before any work; the inputs are untouched."""
    run, _ = trained
    val = os.path.join(coco, 'val2017')
    ann = os.path.join(coco, 'annotations', 'instances_val2017.json')
    png = tmp_path / 'png'  # a PNG dataset: overlays would take the images' own names
    shutil.copytree(val, png)
    for path in png.iterdir():
        Image.open(path).save(path.with_suffix('.png'))
        path.unlink()
    png_ann = json.load(open(ann))
    for info in png_ann['images']:
        info['file_name'] = os.path.splitext(info['file_name'])[0] + '.png'
    (tmp_path / 'png.json').write_text(json.dumps(png_ann))
    before = {p: open(p, 'rb').read() for p in [ann, *glob.glob(str(png / '*'))]}
    cases = [
        (validate_det.cli, [coco, '--checkpoint', run, '--results-file', ann],
         f'--results-file {ann} would write over the annotation file {ann}'),
        (validate_det.cli, ['--ann', str(tmp_path / 'png.json'), '--images', str(png), '--checkpoint', run,
                            '--save-overlays', str(png)], f'--save-overlays {png} would write over the image {png}'),
        (validate_det.cli, [coco, '--checkpoint', run, '--results-file', str(tmp_path / 'r.json'), '--save-results',
                            str(tmp_path / 'r.json')], f'--save-results {tmp_path / "r.json"} and --results-file'),
        (predict.cli, [str(png), '--checkpoint', run, '--save-overlays', str(png)],
         f'--save-overlays {png} would write over the image {png}'),
        (predict.cli, [val, '--checkpoint', run, '--results-file', str(tmp_path / 'p.json'), '--save-results',
                       str(tmp_path / 'p.json')], f'--save-results {tmp_path / "p.json"} and --results-file'),
    ]
    for cli, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli([*argv, '-j', '0'])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith('ERROR')]
        assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], err[-2000:]
    assert before == {p: open(p, 'rb').read() for p in before}
    assert not (tmp_path / 'r.json').exists() and not (tmp_path / 'p.json').exists()


def test_a_phone_photograph_is_predicted_in_proportion_and_bad_images_are_listed(trained, tmp_path, capsys):
    """A 12-megapixel JPEG stored turned, with an orientation tag, beside a 2x20000 strip and an empty
    file: the photograph's detections come at its size as shown, the masks are pasted for the kept
    detections only (growth of the process's peak memory under 1 GB; pasting all 100 at full size as
    floats took 4.8 GB), and the other two are listed as unreadable with why, the run going on."""
    from tests.test_crafted_inputs import run_measured
    run, _ = trained
    folder = tmp_path / 'photos'
    folder.mkdir()
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 255, (3000 // 8, 4000 // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees: 3000 wide, 4000 high
    photo.save(folder / 'phone.jpg', exif=exif, quality=90)
    del stored, photo
    Image.new('RGB', (2, 20000), 'white').save(folder / 'strip.png')
    (folder / 'empty.jpg').write_bytes(b'')
    code, output, growth = run_measured(predict.cli, [str(folder), '--checkpoint', run, '-j', '0',
                                                      '--score-threshold', '0.05', '--save-results',
                                                      str(tmp_path / 'found.json'), '--save-overlays',
                                                      str(tmp_path / 'over')], capsys)
    assert code == 1, output[-3000:]
    assert f'unreadable, skipped: {folder / "strip.png"}: 2x20000 is too narrow to predict on' in output
    assert f'unreadable, skipped: {folder / "empty.jpg"}: not a readable image' in output
    assert '2 of 3 images could not be read' in output
    found = json.load(open(tmp_path / 'found.json'))
    [image] = found['images']
    assert (image['width'], image['height']) == (3000, 4000)
    assert all(a['score'] >= 0.05 and a['segmentation']['size'] == [4000, 3000] for a in found['annotations'])
    assert Image.open(tmp_path / 'over' / 'phone.png').size == (3000, 4000)
    assert growth < 1024, growth


def test_masks_are_blended_as_torchvision_draws_them_one_at_a_time():
    from torchvision.utils import draw_segmentation_masks
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    probabilities = torch.rand(4, 1, 40, 50)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 99, 199)]
    drawn = blend_masks(image, probabilities, [0, 2, 3], [colours[0], colours[2], colours[3]])
    expected = draw_segmentation_masks(image, probabilities[[0, 2, 3], 0] > 0.5, alpha=0.45,
                                       colors=[colours[0], colours[2], colours[3]])
    masks = probabilities[[0, 2, 3], 0] > 0.5
    once, overlap = masks.sum(0) == 1, masks.sum(0) > 1  # torchvision blacks overlaps out; here the last mask shows
    assert once.any() and overlap.any()
    assert torch.equal(drawn[:, once], expected[:, once])
    assert torch.equal(drawn[:, ~masks.any(0)], image[:, ~masks.any(0)])
    last = torch.tensor(colours[3], dtype=torch.float32)[:, None]
    on_top = overlap & masks[2]
    assert torch.equal(drawn[:, on_top], (image[:, on_top] * 0.55 + last * 0.45).to(torch.uint8))
