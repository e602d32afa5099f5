"""A VOLO with every block type of the real ones (outlookers, downsample, transformers, class
attention, both heads, MixToken) but one block per stage and narrow widths, for the tests whose
subject is the code path, not the size: `small_volo()` for the tests that build a model (compile,
export, kernels), and the same model registered with timm as `volo_test` for the training runs of
main.py / validate.py in the test processes, as timm registers test_vit for its own tests.
Importing this module registers it (tests/conftest.py does, for every test process); the
repository itself never does."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

import models
from models._builder import pretrained_overlay
from models.volo import VARIANTS, VOLO, checkpoint_filter_fn

SMALL_LAYOUT = dict(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), stem_hidden_dim=16)


def small_volo(img_size=32, num_classes=10, **kwargs):
    return models.volo_d1(img_size=img_size, num_classes=num_classes, **SMALL_LAYOUT, **kwargs)


default_cfgs = generate_default_cfgs({'volo_test.untrained': dict(
    input_size=(3, 224, 224), crop_pct=0.96, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD, num_classes=1000, first_conv='patch_embed.conv.0', classifier=('head', 'aux_head'),
    fixed_input_size=True)})


@register_model
def volo_test(pretrained=False, **kwargs):
    """small_volo() under a name of its own (VOLO-D1's MLP ratios and heads' layout)."""
    overlay = pretrained_overlay(kwargs.get('img_size'), kwargs.pop('pretrained_cfg_overlay', None))
    layout = dict(VARIANTS['volo_d1'], **SMALL_LAYOUT, downsamples=(True, False, False, False),
                  outlook_attention=(True, False, False, False))
    return build_model_with_cfg(VOLO, 'volo_test', pretrained, pretrained_cfg_overlay=overlay,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
                                **dict(layout, **kwargs))
