"""Semantic segmentation with VOLO and Visformer backbones: a four-level feature pyramid and
mmseg-compatible UPerHead / FCNHead.

The segmentor's state dict has four parts: `backbone.*` (the classification model's own keys, so
release files and ImageNet checkpoints initialise it), `neck.*` (the pyramid), and
`decode_head.*` / `auxiliary_head.*` with mmseg's module structure and key names (a ConvModule is
`.conv` + `.bn`), so decode-head weights move between mmseg checkpoints and this repository.

The pyramid (strides 4, 8, 16, 32): the backbone's last stage feeds stride 32; every finer level
takes the deepest other stage whose stride is closest to it, then a 2x transposed conv + BN + GELU
brings a coarser map up, a 2x2 max-pool brings a finer one down, a map at the right stride passes
as it is. VOLO-D1 (stages: outlooker at 8, transformer stages at 16): the outlooker stage's output
feeds strides 4 (up) and 8, the third stage's output stride 16 and the last stage's output stride
32 (down). Visformer v1 (8/16/32): stage 1 up for 4; v2 (4/8/16/32): every stage as it is.
"""
import math
from typing import List, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import ModelHooks, model_hooks, register_model_hooks
from . import visformer, volo

__all__ = ['size_divisor', 'ConvModule', 'FeaturePyramid', 'UPerHead', 'FCNHead', 'Segmentor', 'build_segmentor',
           'build_pyramid_backbone', 'pyramid_features',
           'SEGMENTATION_BACKBONES', 'pyramid_taps']

SEGMENTATION_BACKBONES = tuple(volo.VARIANTS) + tuple(visformer.VARIANTS)
PYRAMID_STRIDES = (4, 8, 16, 32)


def size_divisor(backbone_name: str) -> int:
    """What input sides must be multiples of for this backbone (its coarsest stride)."""
    if backbone_name in volo.VARIANTS:
        return 16
    if backbone_name in visformer.VARIANTS:
        return 2 * math.prod(visformer.VARIANTS[backbone_name]['patch_sizes'])
    raise ValueError(f'unknown segmentation backbone {backbone_name!r}; choose one of '
                     f'{", ".join(SEGMENTATION_BACKBONES)}')


class ConvModule(nn.Module):
    """mmcv's ConvModule as mmseg's heads use it: conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


def _resize(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class _DecodeHead(nn.Module):
    """What mmseg's decode heads share: Dropout2d and the 1x1 `conv_seg` classifier (normal std 0.01)."""

    def __init__(self, channels, num_classes, dropout_ratio):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x):
        return self.conv_seg(self.dropout(x))


class UPerHead(_DecodeHead):
    """UperNet: pyramid pooling on the last input, FPN top-down fusion, all levels fused at the
    first input's resolution. Keys and shapes as mmseg's UPerHead."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels=512, pool_scales=(1, 2, 3, 6),
                 dropout_ratio=0.1):
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_channels = list(in_channels)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels[-1], channels, 1)) for scale in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x):
        pooled = [_resize(module(x), x.shape[2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, inputs: List[torch.Tensor]):
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'UPerHead expects {len(self.in_channels)} feature maps, got {len(inputs)}')
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)] + [self.psp_forward(inputs[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.classify(fused)


class FCNHead(_DecodeHead):
    """mmseg's FCNHead as the auxiliary head: `num_convs` 3x3 ConvModules on input `in_index`, no
    input concatenation."""

    def __init__(self, in_channels: int, num_classes: int, channels=256, num_convs=1, in_index=2, dropout_ratio=0.1):
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_index = in_index
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)])

    def forward(self, inputs: List[torch.Tensor]):
        return self.classify(self.convs(inputs[self.in_index]))


class _Upsample2x(nn.Sequential):
    def __init__(self, channels):
        super().__init__(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2), nn.BatchNorm2d(channels),
                         nn.GELU())


def pyramid_taps(reductions: Sequence[int], strides=PYRAMID_STRIDES) -> List[int]:
    """Which backbone stage feeds each pyramid level: the last stage the coarsest level, each other
    level the deepest earlier stage whose stride is closest to the level's."""
    last = len(reductions) - 1
    taps = []
    for stride in strides[:-1]:
        candidates = range(last) if last > 0 else range(1)
        best = min(abs(reductions[i] - stride) for i in candidates)
        taps.append(max(i for i in candidates if abs(reductions[i] - stride) == best))
    return taps + [last]


class FeaturePyramid(nn.Module):
    """Brings backbone maps at `in_strides` to `out_strides`: x2 up (ConvTranspose 2x2/2 + BN +
    GELU), as is, or x2 down (max-pool 2x2). Channels are unchanged."""

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_strides=PYRAMID_STRIDES):
        super().__init__()
        levels = []
        for channels, stride, target in zip(in_channels, in_strides, out_strides):
            if stride == target:
                levels.append(nn.Identity())
            elif stride == 2 * target:
                levels.append(_Upsample2x(channels))
            elif 2 * stride == target:
                levels.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                raise ValueError(f'a stride-{stride} map cannot feed the stride-{target} level (factor 2 at most)')
        self.levels = nn.ModuleList(levels)
        self.out_channels = list(in_channels)
        self.out_strides = list(out_strides)

    def forward(self, features: List[torch.Tensor]):
        return [level(x) for level, x in zip(self.levels, features)]


class Segmentor(nn.Module):
    """backbone -> neck -> decode_head (+ auxiliary_head in training).

    Eval mode: logits at the input size. Train mode: (decode logits at stride 4, auxiliary logits
    at stride 16); the loss resizes them to the label. Inputs: sides multiples of the backbone's
    coarsest stride (32 for Visformer v1, 16 otherwise)."""

    def __init__(self, backbone, taps, neck, decode_head, auxiliary_head=None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.taps = list(taps)
        self.num_classes = decode_head.num_classes
        self.size_divisor = max(info['reduction'] for info in backbone.feature_info)

    def extract_features(self, images):
        return pyramid_features(self.backbone, self.taps, self.neck, images)

    def forward(self, images):
        h, w = images.shape[2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f'input {h}x{w}: sides must be multiples of {self.size_divisor}')
        levels = self.extract_features(images)
        logits = self.decode_head(levels)
        if self.training:
            aux = self.auxiliary_head(levels) if self.auxiliary_head is not None else None
            return logits, aux
        return _resize(logits, (h, w))


def build_pyramid_backbone(backbone_name: str, img_size, caller: str, **backbone_kwargs):
    """(backbone, taps, neck): the classification model pruned to the stages the pyramid takes (its
    keys unchanged), which stage feeds each level, and the FeaturePyramid to strides 4-32. Shared
    by the segmentors and the detectors."""
    for key in ('features_only', 'num_classes', 'pretrained'):
        if key in backbone_kwargs:
            raise ValueError(f'{caller}: {key} is not a backbone option here')
    backbone = timm.create_model(backbone_name, img_size=img_size, num_classes=0, **backbone_kwargs)
    reductions = [info['reduction'] for info in backbone.feature_info]
    taps = pyramid_taps(reductions)
    backbone.prune_intermediate_layers(sorted(set(taps)), prune_norm=True, prune_head=True)
    channels = [backbone.feature_info[i]['num_chs'] for i in taps]
    return backbone, taps, FeaturePyramid(channels, [reductions[i] for i in taps])


def pyramid_features(backbone, taps, neck, images):
    """The four pyramid levels (strides 4, 8, 16, 32) of `images`."""
    indices = sorted(set(taps))
    maps = dict(zip(indices, backbone.forward_intermediates(images, indices=indices, intermediates_only=True)))
    return neck([maps[i] for i in taps])


def build_segmentor(backbone_name: str, num_classes: int, img_size=(512, 512), head_channels=512,
                    aux_channels=256, auxiliary_head=True, **backbone_kwargs) -> Segmentor:
    """A UperNet segmentor on a VOLO or Visformer backbone built for `img_size` crops (other input
    sizes work: position embeddings are resized on the fly). backbone_kwargs go to the backbone's
    factory (e.g. drop_path_rate, outlook_impl). Initialise the backbone from a classification
    checkpoint with `utils.load_pretrained_weights(segmentor.backbone, FILE)`."""
    divisor = size_divisor(backbone_name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(side <= 0 or side % divisor for side in img_size):
        raise ValueError(f'img_size {img_size[0]}x{img_size[1]}: {backbone_name} needs sides that are multiples of '
                         f'{divisor}')
    backbone, taps, neck = build_pyramid_backbone(backbone_name, img_size, 'build_segmentor', **backbone_kwargs)
    decode_head = UPerHead(neck.out_channels, num_classes, channels=head_channels)
    aux = FCNHead(neck.out_channels[2], num_classes, channels=aux_channels, in_index=2) if auxiliary_head else None
    model = Segmentor(backbone, taps, neck, decode_head, aux)
    model.backbone_name, model.img_size = backbone_name, img_size
    return model


def checkpoint_filter_fn(state_dict, model):
    """A segmentor checkpoint adapted to `model`: `module.` stripped, the backbone part adapted by
    its own model file (position embeddings resized)."""
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    hooks = model_hooks(model.backbone)
    if backbone and hooks is not None:
        backbone = hooks.checkpoint_filter_fn(backbone, model.backbone)
    rest = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    return {**{f'backbone.{k}': v for k, v in backbone.items()}, **rest}


def checkpoint_variant(state_dict):
    """'<backbone variant> + UPerHead' for a segmentor state dict."""
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if not backbone:
        return 'a classification checkpoint (no backbone.* keys: load it into the segmentor\'s .backbone)'
    for module in (volo, visformer):
        found = module.checkpoint_variant(backbone)
        if found is not None:
            return f'{found} + UPerHead'
    return 'an unknown segmentor'


register_model_hooks(Segmentor, ModelHooks(checkpoint_filter_fn, checkpoint_variant))
