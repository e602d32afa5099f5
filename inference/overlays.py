"""What predictions look like on their images: label maps blended in class colours, detections'
masks, boxes and scores drawn, each image read as it is shown."""
import math

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from data.images import read_image
from utils.det_metrics import binary_mask

OVERLAY_MIN_SIDE = 384  # pixels: smaller images are drawn enlarged


def class_palette(num_classes):
    """A fixed, well-spread colour per class of a label map (class 0 grey), as a (classes, 3) array."""
    rng = np.random.default_rng(12345)
    colours = rng.integers(0, 256, size=(max(num_classes, 1), 3), dtype=np.uint8)
    colours[0] = (120, 120, 120)
    return colours


def make_overlay(image_path, pred, colours, alpha=0.5):
    """The original image blended with the prediction's class colours (predictions at the label's
    size, which is the image's)."""
    image = np.asarray(read_image(image_path), dtype=np.float32)
    colour = colours[np.minimum(pred, len(colours) - 1)].astype(np.float32)
    return Image.fromarray((image * (1 - alpha) + colour * alpha).astype(np.uint8))


def detection_palette(num_classes):
    """A fixed, well-spread colour per detector label (label 0, the background, is never drawn)."""
    rng = np.random.default_rng(12345)
    return [tuple(int(c) for c in rng.integers(40, 256, size=3)) for _ in range(num_classes + 1)]


def draw_detections(image_path, output, class_names, threshold, colours, min_side=OVERLAY_MIN_SIDE):
    """The image with the detections scoring at least `threshold`: masks (Mask R-CNN) blended in,
    boxes, and 'name score' labels. Images with a side under `min_side` are enlarged (by a whole
    factor, nearest) so that the labels stay readable."""
    image = read_image(image_path)
    factor = max(1, math.ceil(min_side / min(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    keep = output['scores'] >= threshold
    labels = output['labels'][keep].tolist()
    colour = [colours[label] for label in labels]
    if 'masks' in output and keep.any():
        image = blend_masks(image, output['masks'], keep.nonzero()[:, 0].tolist(), colour, factor)
    if keep.any():
        text = [f'{class_names[label - 1]} {score:.2f}' for label, score in zip(labels, output['scores'][keep].tolist())]
        image = draw_bounding_boxes(image, output['boxes'][keep] * factor, labels=text, colors=colour, width=2)
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def blend_masks(image, masks, indices, colours, factor=1, alpha=0.45):
    """`image` (3, H, W uint8) with the masks `indices` of `masks` (binary_mask reads them, one at a
    time, enlarged by `factor`) painted in `colours` and blended at `alpha`: what
    draw_segmentation_masks draws, without stacking every mask at the image's size; where masks
    overlap the later one shows (torchvision blacks overlaps out)."""
    painted, covered = image.clone(), torch.zeros(image.shape[1:], dtype=torch.bool)
    for i, colour in zip(indices, colours):
        mask = binary_mask(masks, i).repeat_interleave(factor, 0).repeat_interleave(factor, 1)
        painted[:, mask] = torch.tensor(colour, dtype=torch.uint8)[:, None]
        covered |= mask
    blended = image.clone()
    blended[:, covered] = (image[:, covered] * (1 - alpha) + painted[:, covered] * alpha).to(torch.uint8)
    return blended
