"""volo_test: a VOLO with one block per stage and narrow layers, registered with timm for the
suite's training runs, as timm registers test_vit for its own. It has every code path of VOLO-D1
(outlooker, transformer and class-attention blocks, aux_head, MixToken) at about 1% of its weights,
so a run's steps, checkpoints and loads cost a fraction of D1's. Importing this module registers it
(tests/conftest.py does, for every test process); the repository itself never does."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from models._builder import pretrained_overlay
from models.volo import VOLO, checkpoint_filter_fn

NAME = 'volo_test'
LAYOUT = dict(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), mlp_ratios=(2, 2, 2, 2),
              stem_hidden_dim=16, downsamples=(True, False, False, False),
              outlook_attention=(True, False, False, False))

default_cfgs = generate_default_cfgs({f'{NAME}.untrained': dict(
    input_size=(3, 224, 224), crop_pct=0.96, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD, num_classes=1000, first_conv='patch_embed.conv.0', classifier=('head', 'aux_head'),
    fixed_input_size=True)})


@register_model
def volo_test(pretrained=False, **kwargs):
    overlay = pretrained_overlay(kwargs.get('img_size'), kwargs.pop('pretrained_cfg_overlay', None))
    return build_model_with_cfg(VOLO, NAME, pretrained, pretrained_cfg_overlay=overlay,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
                                **dict(LAYOUT, **kwargs))
