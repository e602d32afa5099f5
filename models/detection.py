"""Object detection and instance segmentation with VOLO and Visformer backbones, on torchvision's
detectors (Mask R-CNN, Faster R-CNN, RetinaNet).

The backbone module torchvision wraps (`DetectionBackbone`) is this repository's classification
model (`.body`, its own keys, so release files and ImageNet runs initialise it with
`utils.load_pretrained_weights(detector.backbone.body, FILE)`; position embeddings are resized to
the input on the fly), the four-level pyramid the segmentors use (`.neck`, strides 4/8/16/32) and
torchvision's FeaturePyramidNetwork (`.fpn`, 256 channels). Two-stage detectors take the levels at
strides 4-32 plus a max-pooled stride-64 level ('0'-'3', 'pool'); RetinaNet takes 8-32 plus P6/P7
from P5 (strides 8-128).

Settings are mmdet's (the recipe the published transformer-backbone tables use,
../shared/reference/detection.md §2) where they differ from torchvision's defaults:
- RPN: 1000 post-NMS proposals per image in training (torchvision: 2000);
- RoIAlign: sampling_ratio=0 (adaptive), as mmcv (torchvision: 2); torchvision's pooler has no
  `aligned=True`, so the half-pixel offset of mmcv stays torchvision's;
- RetinaNet: 100 detections per image (torchvision: 300);
- labels: torchvision's convention, 0 = background and classes 1..num_classes (`num_classes` here
  counts the object classes only).
Images are float in [0, 1], normalised and resized (short side 800, long side <= 1333) inside the
model, padded to a multiple of 32.
"""
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .segmentation import SEGMENTATION_BACKBONES, build_pyramid_backbone, pyramid_features, size_divisor

__all__ = ['DetectionBackbone', 'build_detector', 'detector_settings', 'inference_size',
           'position_grid_size', 'DETECTORS', 'FPN_CHANNELS']

DETECTORS = ('mask_rcnn', 'faster_rcnn', 'retinanet')
FPN_CHANNELS = 256
TWO_STAGE_STRIDES = (4, 8, 16, 32, 64)
RETINANET_STRIDES = (8, 16, 32, 64, 128)


class DetectionBackbone(nn.Module):
    """Classification model -> pyramid (strides 4-32) -> FPN, as torchvision's detectors want it:
    `out_channels` and an OrderedDict of maps with one name per anchor level."""

    def __init__(self, backbone_name, img_size=(800, 1344), one_stage=False, fpn_channels=FPN_CHANNELS,
                 **backbone_kwargs):
        super().__init__()
        self.body, self.taps, self.neck = build_pyramid_backbone(backbone_name, img_size, 'build_detector',
                                                                 **backbone_kwargs)
        self.backbone_name = backbone_name
        self.one_stage = one_stage
        channels = self.neck.out_channels[1:] if one_stage else self.neck.out_channels
        extra = LastLevelP6P7(fpn_channels, fpn_channels) if one_stage else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(list(channels), fpn_channels, extra_blocks=extra)
        self.out_channels = fpn_channels
        self.strides = RETINANET_STRIDES if one_stage else TWO_STAGE_STRIDES
        self.size_divisor = size_divisor(backbone_name)

    def forward(self, images) -> Dict[str, torch.Tensor]:
        levels = pyramid_features(self.body, self.taps, self.neck, images)
        if self.one_stage:
            levels = levels[1:]
        return self.fpn(OrderedDict((str(i), x) for i, x in enumerate(levels)))


def build_detector(backbone_name: str, num_classes: int, kind: str = 'mask_rcnn', min_size=800, max_size=1333,
                   fpn_channels: int = FPN_CHANNELS, rois_per_image: int = 512, **backbone_kwargs):
    """torchvision's Mask R-CNN / Faster R-CNN / RetinaNet on a VOLO or Visformer backbone for
    `num_classes` object classes (labels 1..num_classes; 0 is the background). backbone_kwargs go to
    the backbone's factory (e.g. drop_path_rate, img_size: the size its position embeddings are
    built for, resized on the fly for other inputs). min_size may be a tuple (a random short side per
    training image). fpn_channels: the width of the FPN and of the heads (the box head's MLP is 4x
    it, torchvision's and mmdet's 1024 at the standard 256); rois_per_image: the proposals sampled per
    image to train the RoI heads (mmdet's and torchvision's 512). Only a CPU-sized demo lowers these."""
    if kind not in DETECTORS:
        raise ValueError(f'kind must be one of {", ".join(DETECTORS)}, got {kind!r}')
    if backbone_name not in SEGMENTATION_BACKBONES:
        raise ValueError(f'unknown detection backbone {backbone_name!r}; choose one of '
                         f'{", ".join(SEGMENTATION_BACKBONES)}')
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive integer (object classes), got {num_classes!r}')
    for name, value in (('fpn_channels', fpn_channels), ('rois_per_image', rois_per_image)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    img_size = backbone_kwargs.pop('img_size', (800, 1344))
    backbone = DetectionBackbone(backbone_name, img_size=img_size, one_stage=kind == 'retinanet',
                                 fpn_channels=fpn_channels, **backbone_kwargs)
    common = dict(min_size=min_size, max_size=max_size, size_divisible=max(32, backbone.size_divisor))
    if kind == 'retinanet':
        sizes = tuple((s * 4, int(s * 4 * 2 ** (1 / 3)), int(s * 4 * 2 ** (2 / 3))) for s in RETINANET_STRIDES)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))  # octave base 4, 3 scales an octave
        return RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, detections_per_img=100, **common)
    names = ['0', '1', '2', '3']
    mlp = 4 * fpn_channels
    two_stage = dict(rpn_post_nms_top_n_train=1000, box_batch_size_per_image=rois_per_image,
                     box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=0),
                     box_head=TwoMLPHead(fpn_channels * 7 * 7, mlp), box_predictor=FastRCNNPredictor(mlp, num_classes + 1),
                     **common)
    if kind == 'faster_rcnn':
        return FasterRCNN(backbone, None, **two_stage)
    return MaskRCNN(backbone, None, mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=0),
                    mask_head=MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1),
                    mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1), **two_stage)


def detector_settings(state_dict, source='checkpoint'):
    """{kind, num_classes, fpn_channels} of the detector that `state_dict` holds (a checkpoint of
    build_detector), read from its head shapes; ValueError naming `source` when it holds none."""
    fpn = state_dict.get('backbone.fpn.inner_blocks.0.0.weight')
    if 'roi_heads.box_predictor.cls_score.weight' in state_dict and fpn is not None:
        kind = 'mask_rcnn' if 'roi_heads.mask_predictor.mask_fcn_logits.weight' in state_dict else 'faster_rcnn'
        classes = state_dict['roi_heads.box_predictor.cls_score.weight'].shape[0] - 1
    elif 'head.classification_head.cls_logits.weight' in state_dict and fpn is not None:
        kind = 'retinanet'
        anchors = state_dict['head.regression_head.bbox_reg.weight'].shape[0] // 4
        classes = state_dict['head.classification_head.cls_logits.weight'].shape[0] // anchors - 1
    else:
        raise ValueError(f'{source} holds no detector (no roi_heads.box_predictor or head.classification_head with '
                         f'backbone.fpn): a classification checkpoint initialises a backbone, train_det.py '
                         f'--backbone-checkpoint FILE')
    return {'kind': kind, 'num_classes': int(classes), 'fpn_channels': int(fpn.shape[0])}


def position_grid_size(backbone_name, short_side, max_size):
    """The (H, W) a detector's backbone builds its position embeddings for: the largest padded
    input at this short side and long-side cap (other inputs resize them on the fly)."""
    divisor = max(32, size_divisor(backbone_name))
    return tuple(-(-side // divisor) * divisor for side in (short_side, max_size))


class PastedMasks:
    """Mask R-CNN's masks of some detections at an image's size, pasted (from the head's 28x28
    probabilities, as torchvision pastes them) when one is asked for: masks[i] is a boolean
    (height, width) tensor on the CPU. The whole stack at a photograph's size would take K x H x W
    bytes; one at a time takes H x W."""

    def __init__(self, probabilities, boxes, size, threshold=0.5):
        self.probabilities, self.boxes, self.size, self.threshold = probabilities, boxes, tuple(size), threshold

    def __len__(self):
        return len(self.boxes)

    def __getitem__(self, i):
        pasted = paste_masks_in_image(self.probabilities[i:i + 1], self.boxes[i:i + 1], self.size)
        return (pasted[0, 0] > self.threshold).cpu()


def kept_detections(model, images, output_sizes, score_threshold):
    """The detections of a torchvision detector (in eval mode) on `images` that score at least
    `score_threshold`, in the coordinates of `output_sizes` ((height, width) each: the images as the
    user has them, of which `images` may be reductions). Mask R-CNN's 'masks' come as PastedMasks,
    each pasted when it is used: model(images) pastes every one of its (up to 100) detections'
    masks as floats at the input size, gigabytes for a phone's photograph. Otherwise what
    model(images) gives, filtered and rescaled."""
    with_masks = isinstance(model, MaskRCNN) and model.roi_heads.has_mask()
    if not with_masks:
        outputs = model(images)
        sizes = [tuple(image.shape[-2:]) for image in images]
    else:
        transformed, _ = model.transform(images)
        features = model.backbone(transformed.tensors)
        proposals, _ = model.rpn(transformed, features)
        outputs, _ = model.roi_heads(features, proposals, transformed.image_sizes)
        sizes = transformed.image_sizes
    kept = []
    for output, size, output_size in zip(outputs, sizes, output_sizes):
        keep = output['scores'] >= score_threshold
        output = {name: value[keep] for name, value in output.items()}
        output['boxes'] = resize_boxes(output['boxes'], size, output_size)
        if with_masks:
            output['masks'] = PastedMasks(output['masks'], output['boxes'], output_size)
        kept.append(output)
    return kept


@contextmanager
def inference_size(model, short_side, max_size):
    """Inside, the detector resizes inputs to `short_side` (long side <= max_size), whatever its
    training sizes."""
    transform = model.transform
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (short_side,), max_size
    try:
        yield model
    finally:
        transform.min_size, transform.max_size = saved
