"""COCO-format data for the detectors: every annotation form through the dataset, category ids
both ways, the results format back through pycocotools, and bad files named."""
import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.coco import CocoInstances
from data.dataset import DataError
from utils.det_metrics import COCO_STAT_NAMES, coco_stats, detections_to_coco, evaluate_detection

CATEGORIES = [{'id': 90, 'name': 'star'}, {'id': 3, 'name': 'disc'}, {'id': 7, 'name': 'square'}]  # ids with gaps


def _rle(binary, compressed=True):
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}
    flat = binary.astype(np.uint8).flatten(order='F')  # uncompressed: run lengths, column-major, from 0
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {'size': list(binary.shape), 'counts': counts}


def make_coco(root, degenerate=True):
    """3 images: a polygon in two parts and a compressed RLE; an uncompressed RLE, a crowd region
    and a degenerate box; an image without annotations."""
    (root / 'images').mkdir()
    images, anns = [], []
    for i, (w, h) in enumerate([(64, 48), (80, 64), (40, 40)], start=1):
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(root / 'images' / f'{i}.png')
        images.append({'id': i * 10, 'file_name': f'{i}.png', 'width': w, 'height': h})
    square = np.zeros((48, 64), bool)
    square[10:30, 30:60] = True
    anns += [
        {'id': 1, 'image_id': 10, 'category_id': 90, 'iscrowd': 0, 'bbox': [2, 4, 20, 30], 'area': 300,
         'segmentation': [[2, 4, 12, 4, 12, 14, 2, 14], [12, 14, 22, 14, 22, 34, 12, 34]]},
        {'id': 2, 'image_id': 10, 'category_id': 7, 'iscrowd': 0, 'bbox': [30, 10, 30, 20], 'area': 600,
         'segmentation': _rle(square)}]
    disc = np.zeros((64, 80), bool)
    disc[20:50, 10:40] = True
    crowd = np.zeros((64, 80), bool)
    crowd[5:20, 50:75] = True
    anns += [
        {'id': 3, 'image_id': 20, 'category_id': 3, 'iscrowd': 0, 'bbox': [10, 20, 30, 30], 'area': 900,
         'segmentation': _rle(disc, compressed=False)},
        {'id': 4, 'image_id': 20, 'category_id': 3, 'iscrowd': 1, 'bbox': [50, 5, 25, 15], 'area': 375,
         'segmentation': _rle(crowd, compressed=False)},
        {'id': 5, 'image_id': 20, 'category_id': 90, 'iscrowd': 0, 'bbox': [60, 40, 0.5, 10], 'area': 5,
         'segmentation': [[60, 40, 60.5, 40, 60.5, 50, 60, 50]]}]
    if not degenerate:  # COCOeval would count it as a ground truth no detection can match
        anns = anns[:-1]
    data = {'images': images, 'annotations': anns, 'categories': CATEGORIES}
    path = root / 'instances.json'
    path.write_text(json.dumps(data))
    return root / 'images', path, data


def test_every_annotation_form_and_the_category_map(tmp_path, caplog):
    images, ann_file, _ = make_coco(tmp_path)
    with caplog.at_level(logging.INFO):
        ds = CocoInstances(str(images), str(ann_file))
    assert '1 boxes narrower or lower than 1 px dropped' in caplog.text
    assert ds.label_to_category == [0, 3, 7, 90] and ds.category_to_label == {3: 1, 7: 2, 90: 3}
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64) and 0 <= image.min() <= image.max() <= 1
    assert target['labels'].tolist() == [3, 2] and target['image_id'] == 10
    assert target['boxes'].tolist() == [[2., 4., 22., 34.], [30., 10., 60., 30.]]
    assert target['masks'].shape == (2, 48, 64)
    assert target['masks'][0, 20, 15] == 1 and target['masks'][0, 20, 5] == 0  # the second polygon part
    assert target['masks'][1].sum() == 600
    _, target = ds[1]  # uncompressed RLE; the crowd region kept and marked; the degenerate box dropped
    assert target['labels'].tolist() == [1, 1] and target['iscrowd'].tolist() == [0, 1]
    assert target['masks'][0].sum() == 900 and target['masks'][1].sum() == 375
    _, target = ds[2]  # no annotations
    assert target['boxes'].shape == (0, 4) and target['masks'].shape == (0, 40, 40) and len(target['labels']) == 0
    train = CocoInstances(str(images), str(ann_file), train=True)
    _, target = train[1]
    assert target['iscrowd'].tolist() == [0]  # crowds are never training positives


def _evaluate(ann_file, results, kind):
    gt = COCO(str(ann_file))
    evaluation = COCOeval(gt, gt.loadRes(results), kind)
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return evaluation.stats


def test_ground_truth_as_detections_scores_ap_one_through_pycocotools(tmp_path):
    images, ann_file, _ = make_coco(tmp_path, degenerate=False)
    ds = CocoInstances(str(images), str(ann_file))
    outputs, ids = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        keep = target['iscrowd'] == 0
        outputs.append({'boxes': target['boxes'][keep], 'labels': target['labels'][keep],
                        'scores': torch.ones(int(keep.sum())), 'masks': target['masks'][keep][:, None].float()})
        ids.append(target['image_id'])
    results = detections_to_coco(outputs, ids, ds.label_to_category)
    assert {r['category_id'] for r in results} == {3, 7, 90} and all(isinstance(r['segmentation']['counts'], str)
                                                                   for r in results)
    assert results[0]['bbox'] == [2.0, 4.0, 20.0, 30.0]  # xywh again
    assert _evaluate(ann_file, results, 'bbox')[0] == pytest.approx(1.0)
    assert _evaluate(ann_file, results, 'segm')[0] == pytest.approx(1.0)
    # a confident false positive on the empty image halves the AP of its category (one ground truth:
    # precision 1/2 at every recall), so the mean over the 3 categories is (0.5 + 1 + 1) / 3
    wrong = results + [{'image_id': 30, 'category_id': 3, 'bbox': [1, 1, 10, 10], 'score': 2.0}]
    assert _evaluate(ann_file, wrong, 'bbox')[0] == pytest.approx(2.5 / 3)


@pytest.mark.parametrize('damage,message', [
    (lambda d: d['annotations'][0].update(image_id=99), 'annotation 1 refers to image 99'),
    (lambda d: d['annotations'][0].update(category_id=5), 'annotation 1 refers to category 5'),
    (lambda d: d['annotations'][1].update(bbox=[50, 10, 30, 20]), 'annotation 2: box .* is outside its image 1.png'),
    (lambda d: d['annotations'][1]['segmentation'].update(size=[10, 10]), 'annotation 2: mask of size'),
    (lambda d: d['images'][2].update(file_name='gone.png'), 'gone.png: image 30 of .* is missing'),
])
def test_bad_annotations_are_one_line_naming_the_file_and_id(tmp_path, damage, message):
    images, ann_file, data = make_coco(tmp_path)
    broken = copy.deepcopy(data)
    damage(broken)
    ann_file.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=message):
        CocoInstances(str(images), str(ann_file))


class _GroundTruthDetector(torch.nn.Module):
    """Answers each image with its own non-crowd ground truth (what a perfect detector outputs)."""

    def __init__(self, dataset):
        super().__init__()
        self.answers = {}
        for i in range(len(dataset)):
            image, target = dataset[i]
            keep = target['iscrowd'] == 0
            self.answers[image.sum().item()] = {
                'boxes': target['boxes'][keep].as_subclass(torch.Tensor), 'labels': target['labels'][keep],
                'scores': torch.linspace(1, 0.5, int(keep.sum())), 'masks': target['masks'][keep][:, None].float()}

    def forward(self, images):
        return [self.answers[image.sum().item()] for image in images]


def test_evaluation_counts_each_image_once_and_equals_pycocotools(tmp_path):
    images, ann_file, _ = make_coco(tmp_path, degenerate=False)
    ds = CocoInstances(str(images), str(ann_file))
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset([ds, ds]), batch_size=2,
                                         collate_fn=lambda batch: tuple(zip(*batch)))  # every image twice
    results, ids = evaluate_detection(_GroundTruthDetector(ds), loader, ds.label_to_category, torch.device('cpu'))
    assert ids == [10, 20, 30] and len(results) == 3
    stats, printed = coco_stats(ds.coco, results)
    assert set(stats) == {'bbox', 'segm'} and list(stats['bbox']) == list(COCO_STAT_NAMES)
    assert stats['bbox']['AP'] == stats['segm']['AP'] == pytest.approx(1.0)
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]' in printed
    for kind in ('bbox', 'segm'):  # the same numbers as pycocotools run directly, to the last digit
        assert [stats[kind][n] for n in COCO_STAT_NAMES] == [float(v) for v in _evaluate(ann_file, results, kind)]
    assert coco_stats(ds.coco, [])[0]['bbox']['AP'] == 0.0  # nothing detected
