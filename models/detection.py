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
from typing import Dict

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .segmentation import SEGMENTATION_BACKBONES, build_pyramid_backbone, pyramid_features, size_divisor

__all__ = ['DetectionBackbone', 'build_detector', 'DETECTORS', 'FPN_CHANNELS']

DETECTORS = ('mask_rcnn', 'faster_rcnn', 'retinanet')
FPN_CHANNELS = 256
TWO_STAGE_STRIDES = (4, 8, 16, 32, 64)
RETINANET_STRIDES = (8, 16, 32, 64, 128)


class DetectionBackbone(nn.Module):
    """Classification model -> pyramid (strides 4-32) -> FPN, as torchvision's detectors want it:
    `out_channels` and an OrderedDict of maps with one name per anchor level."""

    def __init__(self, backbone_name, img_size=(800, 1344), one_stage=False, **backbone_kwargs):
        super().__init__()
        self.body, self.taps, self.neck = build_pyramid_backbone(backbone_name, img_size, 'build_detector',
                                                                 **backbone_kwargs)
        self.backbone_name = backbone_name
        self.one_stage = one_stage
        channels = self.neck.out_channels[1:] if one_stage else self.neck.out_channels
        extra = LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS) if one_stage else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(list(channels), FPN_CHANNELS, extra_blocks=extra)
        self.out_channels = FPN_CHANNELS
        self.strides = RETINANET_STRIDES if one_stage else TWO_STAGE_STRIDES
        self.size_divisor = size_divisor(backbone_name)

    def forward(self, images) -> Dict[str, torch.Tensor]:
        levels = pyramid_features(self.body, self.taps, self.neck, images)
        if self.one_stage:
            levels = levels[1:]
        return self.fpn(OrderedDict((str(i), x) for i, x in enumerate(levels)))


def build_detector(backbone_name: str, num_classes: int, kind: str = 'mask_rcnn', min_size=800, max_size=1333,
                   **backbone_kwargs):
    """torchvision's Mask R-CNN / Faster R-CNN / RetinaNet on a VOLO or Visformer backbone for
    `num_classes` object classes (labels 1..num_classes; 0 is the background). backbone_kwargs go to
    the backbone's factory (e.g. drop_path_rate, img_size: the size its position embeddings are
    built for, resized on the fly for other inputs). min_size may be a tuple (a random short side per
    training image)."""
    if kind not in DETECTORS:
        raise ValueError(f'kind must be one of {", ".join(DETECTORS)}, got {kind!r}')
    if backbone_name not in SEGMENTATION_BACKBONES:
        raise ValueError(f'unknown detection backbone {backbone_name!r}; choose one of '
                         f'{", ".join(SEGMENTATION_BACKBONES)}')
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive integer (object classes), got {num_classes!r}')
    img_size = backbone_kwargs.pop('img_size', (800, 1344))
    backbone = DetectionBackbone(backbone_name, img_size=img_size, one_stage=kind == 'retinanet', **backbone_kwargs)
    common = dict(min_size=min_size, max_size=max_size, size_divisible=max(32, backbone.size_divisor))
    if kind == 'retinanet':
        sizes = tuple((s * 4, int(s * 4 * 2 ** (1 / 3)), int(s * 4 * 2 ** (2 / 3))) for s in RETINANET_STRIDES)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))  # octave base 4, 3 scales an octave
        return RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, detections_per_img=100, **common)
    names = ['0', '1', '2', '3']
    two_stage = dict(rpn_post_nms_top_n_train=1000,
                     box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=0), **common)
    if kind == 'faster_rcnn':
        return FasterRCNN(backbone, num_classes + 1, **two_stage)
    return MaskRCNN(backbone, num_classes + 1, mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=0),
                    **two_stage)
