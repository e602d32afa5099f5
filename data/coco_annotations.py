"""A COCO-format annotation file read and checked field by field before anything is built from it:
what labelling tools export goes wrong in ways pycocotools does not notice (a NaN in a polygon, an
RLE whose counts do not cover its mask, duplicate ids, a size given as a string), and each such
problem is one DataError naming the file, the image or annotation id and the field. Nothing in
proportion to what a field claims (a mask size, a run length) is allocated while checking."""
import json
import logging
import math
import numbers

from .dataset import DataError

_logger = logging.getLogger(__name__)

BOX_SLACK = 1.0  # pixels a box may pass its image's edge (COCO's float boxes round outwards)


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_numbers(values):
    return isinstance(values, list) and all(_number(v) and math.isfinite(v) for v in values)


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def compressed_rle_total(counts: str) -> int:
    """The sum of the run lengths of COCO's compressed RLE string (pycocotools' rleFrString: 5 bits a
    character with a continuation bit, the runs after the second stored as differences), without
    decoding the mask."""
    runs, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError('the string ends inside a run length')
            c = ord(counts[position]) - 48
            if not 0 <= c < 64:
                raise ValueError(f'character {counts[position]!r} is not one of RLE\'s')
            value |= (c & 0x1f) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    if any(r < 0 for r in runs):
        raise ValueError('a run length is negative')
    return sum(runs)


class _Checker:
    def __init__(self, path, with_masks):
        self.path, self.with_masks = path, with_masks

    def fail(self, where, problem, separator=': '):
        raise DataError(f'{self.path}: {where}{separator}{problem}')

    def images(self, images):
        if not isinstance(images, list):
            self.fail('images', f'expected a list of images, found {type(images).__name__}')
        by_id = {}
        for index, image in enumerate(images):
            if not isinstance(image, dict):
                self.fail(f'images[{index}]', f'expected an object, found {type(image).__name__}')
            where = f'image {image.get("id", f"#{index}")}'
            if not isinstance(image.get('id'), int) or isinstance(image.get('id'), bool):
                self.fail(f'images[{index}]', f'id must be a whole number, found {image.get("id")!r}')
            if not isinstance(image.get('file_name'), str) or not image['file_name']:
                self.fail(where, f'file_name must be a file name, found {image.get("file_name")!r}')
            for field in ('width', 'height'):
                if not _positive_int(image.get(field)):
                    self.fail(where, f'{field} must be a positive whole number, found {image.get(field)!r}')
            if image['id'] in by_id:
                other = by_id[image['id']]['file_name']
                self.fail(where, f'the id is used twice, by {other} and {image["file_name"]}' if other !=
                          image['file_name'] else f'{image["file_name"]} is listed twice')
            by_id[image['id']] = image
        return by_id

    def categories(self, categories):
        if not isinstance(categories, list):
            self.fail('categories', f'expected a list of categories, found {type(categories).__name__}')
        ids, names = set(), {}
        for index, category in enumerate(categories):
            if not isinstance(category, dict) or not isinstance(category.get('id'), int) or \
                    isinstance(category.get('id'), bool):
                self.fail(f'categories[{index}]', 'expected an object with a whole-number id')
            if category['id'] in ids:
                self.fail(f'category {category["id"]}', 'the id is used twice')
            ids.add(category['id'])
            name = category.get('name')
            if name is not None and name in names:
                _logger.warning('%s: categories %d and %d are both named %r', self.path, names[name], category['id'],
                                name)
            names.setdefault(name, category['id'])
        return ids

    def annotation(self, ann, images, categories):
        where = f'annotation {ann.get("id")}'
        if ann.get('image_id') not in images:
            self.fail(where, f'refers to image {ann.get("image_id")}, which the file does not list', ' ')
        if ann.get('category_id') not in categories:
            self.fail(where, f'refers to category {ann.get("category_id")}, which the file does not list', ' ')
        image = images[ann['image_id']]
        width, height = image['width'], image['height']
        bbox = ann.get('bbox')
        if not _finite_numbers(bbox) or len(bbox) != 4:
            self.fail(where, f'bbox must be four finite numbers [x, y, width, height], found {bbox!r}')
        x, y, w, h = bbox
        if x < -BOX_SLACK or y < -BOX_SLACK or x + w > width + BOX_SLACK or y + h > height + BOX_SLACK:
            self.fail(where, f'box {bbox} is outside its image {image["file_name"]} ({width}x{height})')
        crowd = ann.get('iscrowd', 0)
        if crowd not in (0, 1) or isinstance(crowd, (str, float)):
            self.fail(where, f'iscrowd must be 0 or 1, found {crowd!r}')
        if 'segmentation' not in ann:
            if self.with_masks:
                self.fail(where, 'segmentation is missing (a mask detector needs polygons or an RLE for every '
                                 'annotation)')
            return
        self.segmentation(ann['segmentation'], where, image)

    def segmentation(self, seg, where, image):
        width, height = image['width'], image['height']
        if isinstance(seg, list):
            if not seg and self.with_masks:
                self.fail(where, 'segmentation is empty (a mask detector needs polygons or an RLE)')
            for part in seg:
                if not _finite_numbers(part):
                    self.fail(where, 'segmentation: a polygon must be a list of finite numbers')
                if len(part) % 2 or len(part) < 6:
                    self.fail(where, f'segmentation: a polygon needs an even number of coordinates, at least 6 '
                                     f'(3 points); found {len(part)}')
                xs, ys = part[0::2], part[1::2]
                if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                    self.fail(where, f'segmentation: a polygon lies far outside its image {image["file_name"]} '
                                     f'({width}x{height})')
        elif isinstance(seg, dict):
            size, counts = seg.get('size'), seg.get('counts')
            if list(size or []) != [height, width]:
                self.fail(where, f'mask of size {size} for image {image["file_name"]} of {height}x{width}')
            if isinstance(counts, list):
                if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                    self.fail(where, 'segmentation: RLE counts must be whole numbers of 0 or more')
                total = sum(counts)
            elif isinstance(counts, str):
                try:
                    total = compressed_rle_total(counts)
                except ValueError as e:
                    self.fail(where, f'segmentation: damaged compressed RLE ({e})')
            else:
                self.fail(where, f'segmentation: RLE counts must be a list or a string, found '
                                 f'{type(counts).__name__}')
            if total != height * width:
                self.fail(where, f'segmentation: RLE counts sum to {total}, not {height}x{width} = {height * width}')
        else:
            self.fail(where, f'segmentation must be polygons (a list) or an RLE (an object), found '
                             f'{type(seg).__name__}')


def read_coco_annotations(path, with_masks=False) -> dict:
    """The contents of the COCO-format file `path`, every field checked (see the module's text);
    `with_masks`: every annotation must have a segmentation."""
    try:
        with open(path, 'rb') as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: not a readable JSON file ({e})') from None
    checker = _Checker(path, with_masks)
    if not isinstance(data, dict):
        raise DataError(f'{path}: expected a JSON object with images, annotations and categories, found a '
                        f'{type(data).__name__}')
    if 'images' not in data:
        raise DataError(f'{path}: not a COCO-format annotation file (no images list)')
    images = checker.images(data['images'])
    categories = checker.categories(data.get('categories', []))
    annotations = data.setdefault('annotations', [])
    if not isinstance(annotations, list):
        raise DataError(f'{path}: annotations: expected a list, found {type(annotations).__name__}')
    seen = set()
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DataError(f'{path}: annotations[{index}]: expected an object, found {type(ann).__name__}')
        if not isinstance(ann.get('id'), int) or isinstance(ann.get('id'), bool):
            raise DataError(f'{path}: annotations[{index}]: id must be a whole number, found {ann.get("id")!r}')
        if ann.get('id') in seen:
            raise DataError(f'{path}: annotation {ann.get("id")}: the id is used twice')
        seen.add(ann.get('id'))
        checker.annotation(ann, images, categories)
    return data
