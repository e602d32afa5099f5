"""torch.hub entry points: `torch.hub.load('OWNER/REPO', 'volo_d1', pretrained=True)`, or
`torch.hub.load(FOLDER, NAME, source='local')` for a checkout.

The classification models are the timm factories (`pretrained=True`: the release weights of the
nearest resolution for VOLO, timm's weights for Visformer v1, MindCV's for v2; every timm keyword
works, e.g. `img_size`, `num_classes`, `pretrained_cfg_overlay=dict(file=...)`). `upernet_<backbone>`
builds a UperNet segmentor (models/segmentation.py); `pretrained=True` initialises its backbone
from the same classification weights (no segmentation weights are released).
"""
import timm as _timm

from layers import model_hooks as _model_hooks

from models import (numerics_kwargs as _numerics_kwargs, visformer_small, visformer_small_v2,  # noqa: F401
                    visformer_tiny, visformer_tiny_v2, volo_d1, volo_d2, volo_d3, volo_d4, volo_d5)
from models.segmentation import build_segmentor as _build_segmentor

dependencies = ['torch', 'timm']


def _upernet(backbone, pretrained=False, num_classes=150, img_size=512, pretrained_cfg_overlay=None, **kwargs):
    tag = _timm.models.get_pretrained_cfg(backbone).tag or ''
    if pretrained and tag.startswith('mindcv'):  # the numerics MindCV's weights were trained with
        kwargs = {**_numerics_kwargs(backbone, 'mindcv'), **kwargs}
    model = _build_segmentor(backbone, num_classes, img_size=img_size, **kwargs)
    if pretrained:
        source = _timm.create_model(backbone, pretrained=True, num_classes=0, img_size=img_size,
                                    pretrained_cfg_overlay=pretrained_cfg_overlay,
                                    **{k: v for k, v in kwargs.items() if k in ('act_layer', 'norm_layer')})
        filter_fn = _model_hooks(model.backbone).checkpoint_filter_fn
        model.backbone.load_state_dict(filter_fn(source.state_dict(), model.backbone), strict=True)
    return model


def _segmentor_entry(backbone):
    def entry(pretrained=False, num_classes=150, img_size=512, **kwargs):
        return _upernet(backbone, pretrained, num_classes, img_size, **kwargs)
    entry.__name__ = f'upernet_{backbone}'
    entry.__doc__ = (f'UperNet (UPerHead + FCN auxiliary head) on {backbone}, for `img_size` crops and `num_classes` '
                     f'classes (ADE20K: 150); pretrained=True initialises the backbone from its classification '
                     f'weights. Keywords: build_segmentor\'s and the backbone factory\'s.')
    return entry


upernet_volo_d1 = _segmentor_entry('volo_d1')
upernet_volo_d2 = _segmentor_entry('volo_d2')
upernet_volo_d3 = _segmentor_entry('volo_d3')
upernet_volo_d4 = _segmentor_entry('volo_d4')
upernet_volo_d5 = _segmentor_entry('volo_d5')
upernet_visformer_tiny = _segmentor_entry('visformer_tiny')
upernet_visformer_small = _segmentor_entry('visformer_small')
upernet_visformer_tiny_v2 = _segmentor_entry('visformer_tiny_v2')
upernet_visformer_small_v2 = _segmentor_entry('visformer_small_v2')
