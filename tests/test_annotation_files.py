"""Annotation files as labelling tools export them, and photographs as phones store them: every
field of a COCO-format file is checked when it is opened (one line naming the file, the id and the
field), the size it claims for an image is checked against the image as shown, and images are read
as shown (EXIF orientation, 16-bit greyscale), in the COCO and segmentation datasets alike."""
import copy
import json
import logging
import math

import numpy as np
import pytest
from PIL import Image

import train_det
from data.coco import CocoInstances
from data.coco_annotations import compressed_rle_total
from data.dataset import DataError
from data.images import read_image
from data.seg_dataset import SegmentationDataset
from tests.test_coco_data import _rle, make_coco


def rewritten(tmp_path, change):
    images, ann_file, data = make_coco(tmp_path)
    data = copy.deepcopy(data)
    change(data)
    ann_file.write_text(json.dumps(data))
    return str(images), str(ann_file)


def annotation(data, ann_id):
    return next(a for a in data['annotations'] if a['id'] == ann_id)


def set_field(ann_id, field, value):
    def change(data):
        if value is DELETE:
            del annotation(data, ann_id)[field]
        else:
            annotation(data, ann_id)[field] = value
    return change


DELETE = object()
SQUARE_RLE = _rle(np.pad(np.ones((20, 30), bool), ((10, 18), (30, 4))))


@pytest.mark.parametrize('change, message', [
    (lambda d: d.clear() or d.update(x=1) or None, 'not a COCO-format annotation file (no images list)'),
    (set_field(1, 'bbox', DELETE), 'annotation 1: bbox must be four finite numbers'),
    (set_field(1, 'bbox', [2, 4, 20]), 'annotation 1: bbox must be four finite numbers'),
    (set_field(1, 'bbox', [2, 4, math.nan, 30]), 'annotation 1: bbox must be four finite numbers'),
    (set_field(1, 'bbox', [2, 4, '20', 30]), 'annotation 1: bbox must be four finite numbers'),
    (set_field(1, 'segmentation', [[2, 4, 12, 4, 12, 14, 2]]), 'annotation 1: segmentation: a polygon needs an '
                                                               'even number of coordinates'),
    (set_field(1, 'segmentation', [[2, 4, 12, 4]]), 'at least 6 (3 points); found 4'),
    (set_field(1, 'segmentation', [[2, 4, 'a', 4, 12, 14]]), 'annotation 1: segmentation: a polygon must be a list '
                                                             'of finite numbers'),
    (set_field(1, 'segmentation', [[2, 4, math.nan, 4, 12, 14]]), 'a polygon must be a list of finite numbers'),
    (set_field(1, 'segmentation', [[2, 4, math.inf, 4, 12, 14]]), 'a polygon must be a list of finite numbers'),
    (set_field(1, 'segmentation', [[2, 4, 9000, 4, 12, 14]]), 'annotation 1: segmentation: a polygon lies far '
                                                              'outside its image 1.png (64x48)'),
    (set_field(1, 'segmentation', []), 'annotation 1: segmentation is empty'),
    (set_field(1, 'segmentation', DELETE), 'annotation 1: segmentation is missing'),
    (set_field(3, 'segmentation', {'size': [64, 80], 'counts': [100, 20, 3]}),
     'annotation 3: segmentation: RLE counts sum to 123, not 64x80 = 5120'),
    (set_field(2, 'segmentation', dict(SQUARE_RLE, counts=SQUARE_RLE['counts'][:-2])),
     'annotation 2: segmentation: RLE counts sum to'),
    (set_field(1, 'iscrowd', '0'), "annotation 1: iscrowd must be 0 or 1, found '0'"),
    (lambda d: d['images'][0].update(width='64'), "image 10: width must be a positive whole number, found '64'"),
    (lambda d: d['images'][1].update(height=0), 'image 20: height must be a positive whole number, found 0'),
    (lambda d: annotation(d, 2).update(id=1), 'annotation 1: the id is used twice'),
    (lambda d: annotation(d, 1).pop('id'), 'annotations[0]: id must be a whole number, found None'),
    (lambda d: annotation(d, 1).update(id=[1]), 'annotations[0]: id must be a whole number, found [1]'),
    (lambda d: d['images'][1].update(id=10), 'image 10: the id is used twice, by 1.png and 2.png'),
    (lambda d: d['categories'][1].update(id=90), 'category 90: the id is used twice'),
])
def test_each_bad_field_is_one_line_naming_file_id_and_field(tmp_path, change, message):
    images, ann_file = rewritten(tmp_path, change)
    with pytest.raises(DataError) as error:
        CocoInstances(images, ann_file)
    assert message in str(error.value) and str(error.value).startswith(ann_file) and '\n' not in str(error.value)


def test_a_top_level_that_is_not_an_object(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'list.json').write_text('[1, 2]')
    with pytest.raises(DataError, match=r'list.json: expected a JSON object with images, annotations and categories, '
                                        r'found a list'):
        CocoInstances(str(tmp_path / 'images'), str(tmp_path / 'list.json'))


def test_a_box_detector_needs_no_masks_and_same_named_categories_warn(tmp_path, caplog):
    def change(data):
        del annotation(data, 1)['segmentation']
        data['categories'][1]['name'] = data['categories'][0]['name']
    images, ann_file = rewritten(tmp_path, change)
    with caplog.at_level(logging.WARNING):
        dataset = CocoInstances(images, ann_file, with_masks=False)
    assert len(dataset) == 3 and "categories 90 and 3 are both named 'star'" in caplog.text


def test_compressed_rle_totals_agree_with_pycocotools():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = rng.integers(1, 120, 2)
        mask = np.asfortranarray((rng.random((height, width)) < rng.random()).astype(np.uint8))
        counts = mask_utils.encode(mask)['counts'].decode()
        assert compressed_rle_total(counts) == height * width


@pytest.mark.parametrize('image_id, claim', [(10, (128, 96)), (20, (40000, 40000))])
def test_a_size_claim_must_match_the_image_as_shown(tmp_path, image_id, claim):
    """An image claimed at twice its size, and one whose claim (with a matching 40000x40000 RLE of a
    few bytes) would decode a 1.6 GB mask: each is refused when the dataset is opened, from the
    image's header, before anything is decoded."""
    def change(data):
        info = next(i for i in data['images'] if i['id'] == image_id)
        info.update(width=claim[0], height=claim[1])
        for ann in data['annotations']:
            if ann['image_id'] == image_id:
                ann['segmentation'] = {'size': [claim[1], claim[0]], 'counts': [claim[0] * claim[1]]}
    images, ann_file = rewritten(tmp_path, change)
    with pytest.raises(DataError, match=rf'image {image_id} is \d+x\d+ as shown, but .* gives it {claim[0]}x{claim[1]}'):
        CocoInstances(images, ann_file)


def exif_rotated(path, array, orientation=6):
    """`array` stored as it is, tagged to be shown turned (6: 90 degrees clockwise)."""
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)


def test_photographs_are_read_as_shown_and_their_boxes_line_up(tmp_path):
    """A portrait photograph stored as landscape with an orientation tag: the annotation file gives the
    shown (portrait) size and a box around the bright top-left corner as shown."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[-20:, :10] = 255  # the stored bottom-left corner is the shown top-left after turning 90 degrees
    (tmp_path / 'images').mkdir()
    exif_rotated(tmp_path / 'images' / 'phone.jpg', stored)
    data = {'images': [{'id': 1, 'file_name': 'phone.jpg', 'width': 40, 'height': 60}],
            'categories': [{'id': 1, 'name': 'corner'}],
            'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'iscrowd': 0, 'bbox': [0, 0, 20, 10],
                             'segmentation': [[0, 0, 20, 0, 20, 10, 0, 10]], 'area': 200}]}
    (tmp_path / 'ann.json').write_text(json.dumps(data))
    image, target = CocoInstances(str(tmp_path / 'images'), str(tmp_path / 'ann.json'))[0]
    assert tuple(image.shape) == (3, 60, 40)
    x0, y0, x1, y1 = target['boxes'][0].int().tolist()
    assert image[:, y0:y1, x0:x1].mean() > 0.9 and image[:, 20:, :].mean() < 0.1


def test_sixteen_bit_images_are_scaled_not_white(tmp_path):
    values = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / 'deep.png')
    image = np.asarray(read_image(tmp_path / 'deep.png'))
    assert image.shape == (48, 64, 3)
    np.testing.assert_allclose(image[..., 0], values.astype(np.int64) * 255 // 65535, atol=0)


def test_segmentation_images_are_read_as_shown(tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)
    exif_rotated(tmp_path / 'photo.jpg', stored)
    Image.fromarray(np.zeros((60, 40), np.uint8)).save(tmp_path / 'label.png')  # the label is drawn as shown
    image, label, _ = SegmentationDataset([(str(tmp_path / 'photo.jpg'), str(tmp_path / 'label.png'))], ['a'])[0]
    assert image.size == (40, 60) and label.shape == (60, 40)


@pytest.mark.parametrize('split, damage', [('train', 'truncated'), ('train', 'empty'), ('val', 'truncated')])
def test_a_damaged_image_is_one_line_and_trained_work_is_kept(tmp_path, capsys, split, damage):
    """In training: one line naming the file. In the evaluation after an epoch: the trained state is
    saved first (as for any failed evaluation) and said, then the file is named; no traceback."""
    from data.synthetic_det import make_coco_dataset
    root = make_coco_dataset(str(tmp_path / 'coco'), train=4, val=2, seed=1)
    victim = sorted((tmp_path / 'coco' / f'{split}2017').iterdir())[0]
    whole = victim.read_bytes()  # truncated: the header stays readable, the pixels end early
    victim.write_bytes(whole[:len(whole) * 2 // 3] if damage == 'truncated' else b'')
    with pytest.raises(SystemExit) as stopped:
        train_det.cli([root, '--model', 'volo_d1', '--fpn-channels', '16', '--train-sizes', '64', '--test-size', '64',
                       '--max-size', '96', '-b', '1', '-j', '0', '--epochs', '1', '--lr-steps',
                       '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('ERROR')]
    assert stopped.value.code == 2 and 'Traceback' not in err, err[-2000:]
    assert victim.name in errors[-1] and 'not a readable image' in errors[-1]
    saved = list((tmp_path / 'out').rglob('last.pth.tar'))
    if split == 'train':
        assert len(errors) == 1 and not saved
    else:
        assert len(errors) == 2 and 'the trained state is saved in' in errors[0] and len(saved) == 1
