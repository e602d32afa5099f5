"""Visformer: The Vision-friendly Transformer (Chen et al., ICCV 2021, arXiv 2104.12533).

BatchNorm everywhere, convolutional bottleneck blocks in the high-resolution stages and
self-attention (1x1-conv projections) in the last two. v1 (`visformer_tiny`, `visformer_small`)
has three stages with timm's state-dict keys, so its weights load unchanged; v2 (MindCV's
`visformer_tiny_v2`, `visformer_small_v2`) has four. q and k are each scaled by
head_dim ** qk_scale_exponent before their product, which keeps fp16 logits in range.

Dense features (timm's `forward_intermediates` / `feature_info` / `features_only`) are the stage
outputs (v1: strides 8, 16, 32; v2: 4, 8, 16, 32); position embeddings are resized (bicubic) on the
fly for inputs of another size.

Registered with timm under timm's own v1 names: `visformer_tiny` / `visformer_small` build this
file's model, with every pretrained tag timm has for them (the same keys, so timm's weights load).
The v2 names carry MindCV's weights (`.mindcv_in1k`, MindSpore files read by layers/mindspore_ckpt.py).
"""
import logging
import math
import warnings
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs, register_model
from timm.models._features import feature_take_indices

from layers import ModelHooks, check_model_arguments, register_model_hooks, resize_pos_embed_nchw
from layers.mindspore_ckpt import read_mindcv_checkpoint

from ._builder import pretrained_overlay

_logger = logging.getLogger(__name__)

torch.fx.wrap('resize_pos_embed_nchw')  # FX: one call (its branch is on the traced grid size)

__all__ = ['Visformer', 'visformer_tiny', 'visformer_small', 'visformer_tiny_v2', 'visformer_small_v2']


class SpatialMlp(nn.Module):
    """1x1 conv, GELU, [3x3 grouped conv, GELU,] 1x1 conv; all without bias."""

    def __init__(self, dim, hidden_dim, spatial_conv=False, group=8, drop=0., act_layer=nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1, bias=False)
        self.act1 = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.conv2 = None
        if spatial_conv:
            self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=group, bias=False)
            self.act2 = act_layer()
        self.conv3 = nn.Conv2d(hidden_dim, dim, 1, bias=False)
        self.drop3 = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop1(self.act1(self.conv1(x)))
        if self.conv2 is not None:
            x = self.act2(self.conv2(x))
        return self.drop3(self.conv3(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a (B, C, H, W) map, 1x1-conv projections."""

    def __init__(self, dim, num_heads=8, qk_scale_exponent=-0.25, attn_drop=0., proj_drop=0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_scale = self.head_dim ** qk_scale_exponent
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.attn_drop = attn_drop
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.head_dim, H * W).permute(1, 0, 2, 4, 3).unbind(0)
        x = F.scaled_dot_product_attention(q * self.qk_scale, k * self.qk_scale, v, scale=1.0,
                                           dropout_p=self.attn_drop if self.training else 0.)
        x = x.permute(0, 1, 3, 2).reshape(B, C, H, W)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """[x + attn(BN(x))], then x + mlp(BN(x)); the attention is absent in convolutional stages."""

    def __init__(self, dim, num_heads, mlp_ratio=4., attention=True, spatial_conv=False, group=8,
                 qk_scale_exponent=-0.25, drop=0., attn_drop=0., drop_path=0., act_layer=nn.GELU,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm1 = self.attn = None
        if attention:
            self.norm1 = norm_layer(dim)
            self.attn = Attention(dim, num_heads, qk_scale_exponent, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = norm_layer(dim)
        hidden = dim * 2 if spatial_conv else int(dim * mlp_ratio)
        self.mlp = SpatialMlp(dim, hidden, spatial_conv=spatial_conv, group=group, drop=drop, act_layer=act_layer)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch_size (with bias), then BatchNorm."""

    def __init__(self, in_chans, embed_dim, patch_size, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class Visformer(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU), then per stage: patch embedding, position embedding, blocks.

    Stages are named from `first_stage` on (1 for v1, whose keys match timm's; 0 for v2), four at
    most (stage0..stage3). `attn_stage` / `spatial_conv` are per-stage '0'/'1' strings. global_pool:
    'avg' (the reference) or '' (the unpooled map; with num_classes=0)."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, init_channels=32, stage_dims=(192, 384, 768),
                 patch_sizes=(4, 2, 2), depths=(7, 4, 4), num_heads=(6, 6, 6), mlp_ratio=4., group=8,
                 attn_stage='011', spatial_conv='100', qk_scale_exponent=-0.25, first_stage=1, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0., pos_embed=True, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d,
                 global_pool='avg'):
        super().__init__()
        check_model_arguments(img_size, num_classes, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                              drop_path_rate=drop_path_rate)
        num_stages = len(stage_dims)
        if first_stage < 0 or first_stage + num_stages > len(STAGE_IDS):
            raise ValueError(f'stages are named stage0..stage3: first_stage {first_stage} with {num_stages} stages '
                             f'does not fit')
        _check_global_pool(global_pool, num_classes)
        if not (len(patch_sizes) == len(depths) == len(num_heads) == len(attn_stage) == len(spatial_conv)
                == num_stages):
            raise ValueError('stage_dims, patch_sizes, depths, num_heads, attn_stage and spatial_conv need one '
                             'entry per stage')
        stride = 2 * math.prod(patch_sizes)
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_h % stride or img_w % stride:
            raise ValueError(f'img_size {img_size} must be a multiple of {stride}')
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = stage_dims[-1]
        self.global_pool = global_pool
        self.stage_ids = list(range(first_stage, first_stage + num_stages))
        for sid in STAGE_IDS:  # the absent ones are None (TorchScript's forward names all four)
            if sid not in self.stage_ids:
                setattr(self, f'patch_embed{sid}', None)
                setattr(self, f'pos_embed{sid}', None)
                setattr(self, f'stage{sid}', None)
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, init_channels, 7, stride=2, padding=3, bias=False),
            norm_layer(init_channels),
            nn.ReLU(inplace=True))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        reduction, in_dim, block = 2, init_channels, 0
        self.feature_info = []
        for sid, dim, patch, depth, heads, attn, spatial in zip(self.stage_ids, stage_dims, patch_sizes, depths,
                                                                 num_heads, attn_stage, spatial_conv):
            reduction *= patch
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stage{sid}'))
            setattr(self, f'patch_embed{sid}', PatchEmbed(in_dim, dim, patch, norm_layer))
            grid = (img_h // reduction, img_w // reduction)
            setattr(self, f'pos_embed{sid}', nn.Parameter(torch.zeros(1, dim, *grid)) if pos_embed else None)
            setattr(self, f'stage{sid}', nn.Sequential(*[
                Block(dim, heads, mlp_ratio, attention=attn == '1', spatial_conv=spatial == '1', group=group,
                      qk_scale_exponent=qk_scale_exponent, drop=drop_rate, attn_drop=attn_drop_rate,
                      drop_path=dpr[block + i], act_layer=act_layer, norm_layer=norm_layer)
                for i in range(depth)]))
            block += depth
            in_dim = dim
        self.norm = norm_layer(self.num_features)
        self.pruned = ()  # state-dict prefixes removed by prune_intermediate_layers
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        for sid in self.stage_ids:
            if getattr(self, f'pos_embed{sid}') is not None:
                trunc_normal_(getattr(self, f'pos_embed{sid}'), std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'pos_embed{sid}' for sid in self.stage_ids if getattr(self, f'pos_embed{sid}') is not None}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        if global_pool is not None:
            _check_global_pool(global_pool, num_classes)
            self.global_pool = global_pool
        elif num_classes > 0:
            _check_global_pool(self.global_pool, num_classes)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    def _embed(self, x, pos_embed: Optional[torch.Tensor]):
        """Patch-embedded x plus the stage's position embedding (resized when the grid differs)."""
        if pos_embed is not None:
            x = self.pos_drop(x + resize_pos_embed_nchw(pos_embed, x.shape[2:]))
        return x

    def _stage(self, sid, x):
        x = self._embed(getattr(self, f'patch_embed{sid}')(x), getattr(self, f'pos_embed{sid}'))
        for blk in getattr(self, f'stage{sid}'):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _stages_scripted(self, x):
        # TorchScript looks up no attribute by a computed name: the four possible stages spelled out
        if self.stage0 is not None:
            x = self.stage0(self._embed(self.patch_embed0(x), self.pos_embed0))
        if self.stage1 is not None:
            x = self.stage1(self._embed(self.patch_embed1(x), self.pos_embed1))
        if self.stage2 is not None:
            x = self.stage2(self._embed(self.patch_embed2(x), self.pos_embed2))
        if self.stage3 is not None:
            x = self.stage3(self._embed(self.patch_embed3(x), self.pos_embed3))
        return x

    def forward_features(self, x):
        x = self.stem(x)
        if torch.jit.is_scripting():
            return self.norm(self._stages_scripted(x))
        for sid in self.stage_ids:
            x = self._stage(sid, x)
        return self.norm(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False):
        """Stage outputs as (B, C, H, W) maps (timm's convention). indices: stage positions (0 = the
        first stage), an int n for the last n, None for all. norm: the final BatchNorm on the last
        stage's map. Returns the list, or (final features, list) unless intermediates_only."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW' (Visformer's maps are channels-first), got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stage_ids), indices)
        last = max_index if stop_early or intermediates_only else len(self.stage_ids) - 1
        intermediates = []
        x = self.stem(x)
        for i, sid in enumerate(self.stage_ids[:last + 1]):
            x = self._stage(sid, x)
            if i in take:
                is_last = i == len(self.stage_ids) - 1
                intermediates.append(self.norm(x) if norm and is_last else x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last one asked for, the head and (when asked, or when stages
        were dropped) the final norm; checkpoint_filter_fn then ignores those keys. Returns the kept
        indices."""
        take, max_index = feature_take_indices(len(self.stage_ids), indices)
        pruned = []
        for sid in self.stage_ids[max_index + 1:]:
            for name in (f'patch_embed{sid}', f'pos_embed{sid}', f'stage{sid}'):
                setattr(self, name, None)
            pruned += [f'patch_embed{sid}.', f'pos_embed{sid}', f'stage{sid}.']
        if max_index < len(self.stage_ids) - 1 or prune_norm:
            self.norm = nn.Identity()
            pruned.append('norm.')
        self.stage_ids = self.stage_ids[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.head = nn.Identity()
            pruned.append('head.')
        self.pruned = tuple(sorted(set(self.pruned) | set(pruned)))
        return take

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path):
        """MindCV's weights (a MindSpore .ckpt, read without MindSpore): timm calls this for the
        `mindcv_in1k` tags (custom_load). A new class count leaves the head as initialised."""
        state_dict = checkpoint_filter_fn(read_mindcv_checkpoint(checkpoint_path).state_dict, self)
        ours, theirs = getattr(self.head, 'weight', None), state_dict.get('head.weight')
        new_head = ours is None or theirs is None or theirs.shape != ours.shape
        if new_head:
            _logger.info('%s: the head is not loaded (%s classes in the file, %d in the model)', checkpoint_path,
                         'no' if theirs is None else theirs.shape[0], self.num_classes)
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
        ours = self.state_dict()
        wrong = sorted(k for k in ours if k not in state_dict and not (new_head and k.startswith('head.')))
        wrong += sorted(k for k, v in state_dict.items() if k not in ours or v.shape != ours[k].shape)
        if wrong:
            raise ValueError(f'{checkpoint_path}: {checkpoint_variant(state_dict) or "not a Visformer"}, not the weights '
                             f'of this Visformer (missing, unexpected or of another shape: {", ".join(wrong[:6])}'
                             f'{" ..." if len(wrong) > 6 else ""})')
        self.load_state_dict(state_dict, strict=not new_head)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


STAGE_IDS = (0, 1, 2, 3)
MINDCV_WEIGHTS = 'https://download.mindspore.cn/toolkits/mindcv/visformer/'


def _check_global_pool(global_pool, num_classes):
    if global_pool not in ('avg', ''):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    if global_pool == '' and num_classes > 0:
        raise ValueError("global_pool='' returns the unpooled feature map: use it with num_classes=0")


def _cfg(**kwargs):
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.9,
            'interpolation': 'bicubic', 'fixed_input_size': True, 'mean': IMAGENET_DEFAULT_MEAN,
            'std': IMAGENET_DEFAULT_STD, 'first_conv': 'stem.0', 'classifier': 'head', 'license': 'apache-2.0',
            'paper_ids': 'arXiv:2104.12533', **kwargs}


def _mindcv_cfg(file):
    # MindSpore checkpoints (custom_load: Visformer.load_pretrained reads them); the evaluation
    # settings stay the v1 ones (crop 0.9, bicubic), which the repository has always used for v2
    return _cfg(url=MINDCV_WEIGHTS + file, custom_load=True, origin_url='https://github.com/mindspore-lab/mindcv')


# v1: timm's tags for its weights (the default) and MindCV's; v2: MindCV's
default_cfgs = generate_default_cfgs({
    'visformer_tiny.in1k': _cfg(hf_hub_id='timm/'),
    'visformer_small.in1k': _cfg(hf_hub_id='timm/'),
    'visformer_tiny.mindcv_in1k': _mindcv_cfg('visformer_tiny-daee0322.ckpt'),
    'visformer_small.mindcv_in1k': _mindcv_cfg('visformer_small-6c83b6db.ckpt'),
    'visformer_tiny_v2.mindcv_in1k': _mindcv_cfg('visformer_tiny_v2-6711a758.ckpt'),
    'visformer_small_v2.mindcv_in1k': _mindcv_cfg('visformer_small_v2-63674ade.ckpt'),
})
# any tag timm has for the v1 names and this file does not: kept, so replacing timm's entries loses none
for _name in ('visformer_tiny', 'visformer_small'):
    for _full_name, _timm_cfg in get_arch_pretrained_cfgs(_name).items():
        _tag = _full_name.partition('.')[2]
        if _tag and _tag not in default_cfgs[_name].cfgs:
            default_cfgs[_name].tags.append(_tag)
            default_cfgs[_name].cfgs[_tag] = _timm_cfg

VARIANTS = {
    'visformer_tiny': dict(init_channels=16, stage_dims=(96, 192, 384), patch_sizes=(4, 2, 2), depths=(7, 4, 4),
                           num_heads=(3, 3, 3), attn_stage='011', spatial_conv='100', qk_scale_exponent=-0.25,
                           first_stage=1),
    'visformer_small': dict(init_channels=32, stage_dims=(192, 384, 768), patch_sizes=(4, 2, 2), depths=(7, 4, 4),
                            num_heads=(6, 6, 6), attn_stage='011', spatial_conv='100', qk_scale_exponent=-0.25,
                            first_stage=1),
    'visformer_tiny_v2': dict(init_channels=24, stage_dims=(48, 96, 192, 384), patch_sizes=(2, 2, 2, 2),
                              depths=(1, 4, 6, 3), num_heads=(1, 3, 6, 12), attn_stage='0011',
                              spatial_conv='1100', qk_scale_exponent=-0.5, first_stage=0),
    'visformer_small_v2': dict(init_channels=32, stage_dims=(64, 128, 256, 512), patch_sizes=(2, 2, 2, 2),
                               depths=(1, 10, 14, 3), num_heads=(2, 4, 8, 16), attn_stage='0011',
                               spatial_conv='1100', qk_scale_exponent=-0.5, first_stage=0),
}


# MindCV's numerics (mindcv.md §3): MindSpore's GELU defaults to the tanh approximation; BatchNorm
# eps is 1e-5 in both frameworks
MINDCV_NUMERICS = dict(act_layer=partial(nn.GELU, approximate='tanh'))


def checkpoint_variant(state_dict):
    """The Visformer variant whose layout a state dict has (stem width, stage widths and depths)."""
    if 'stem.0.weight' not in state_dict:
        return None
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name, cfg in VARIANTS.items():
        sids = range(cfg['first_stage'], cfg['first_stage'] + len(cfg['stage_dims']))
        layout = all(shapes.get(f'patch_embed{sid}.proj.weight', (0,))[0] == dim and
                     len({k.split('.')[1] for k in shapes if k.startswith(f'stage{sid}.')}) == depth
                     for sid, dim, depth in zip(sids, cfg['stage_dims'], cfg['depths']))
        if layout and shapes['stem.0.weight'][0] == cfg['init_channels']:
            return name
    return 'an unknown Visformer layout'


def checkpoint_filter_fn(state_dict, model):
    """A checkpoint's state dict adapted to `model`: `module.` stripped, the parts a pruned model
    (features only) no longer has dropped, position embeddings resized (bicubic) to the model's grids."""
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if getattr(model, 'pruned', ()):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(model.pruned)}
    for sid in model.stage_ids:
        key = f'pos_embed{sid}'
        theirs, ours = state_dict.get(key), getattr(model, key, None)
        if theirs is not None and ours is not None and theirs.ndim == 4 and theirs.shape[:2] == ours.shape[:2]:
            state_dict[key] = resize_pos_embed_nchw(theirs, ours.shape[2:])
    return state_dict


def _create(variant, pretrained=False, **kwargs):
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    if isinstance(pretrained_cfg, str) and pretrained_cfg not in default_cfgs[variant].cfgs:
        raise ValueError(f'{variant} has no pretrained tag {pretrained_cfg!r}; known: '
                         f'{sorted(default_cfgs[variant].cfgs)}')
    tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None if pretrained_cfg else \
        default_cfgs[variant].tags[0]
    if pretrained and tag and tag.startswith('mindcv'):
        for key, value in MINDCV_NUMERICS.items():  # the numerics MindCV's weights were trained with
            kwargs.setdefault(key, value)
    img_size = kwargs.get('img_size')
    overlay = pretrained_overlay(img_size, kwargs.pop('pretrained_cfg_overlay', None))
    num_stages = len(kwargs.get('stage_dims', VARIANTS[variant]['stage_dims']))
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', tuple(range(num_stages))), feature_cls='getter',
                       **(kwargs.pop('feature_cfg', None) or {}))
    return build_model_with_cfg(
        Visformer, variant, pretrained, pretrained_cfg=pretrained_cfg or tag, pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **{**VARIANTS[variant], **kwargs})


register_model_hooks(Visformer, ModelHooks(checkpoint_filter_fn, checkpoint_variant, tuple(VARIANTS)))


def _register(fn):
    # timm's entries for the v1 names are replaced knowingly: the same architecture and keys, and
    # default_cfgs above carries all of timm's tags for them. Any other overwrite still warns.
    ours = {'visformer_tiny', 'visformer_small'}
    if fn.__name__ in ours:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message=f'Overwriting {fn.__name__} in registry', category=UserWarning)
            return register_model(fn)
    return register_model(fn)


@_register
def visformer_tiny(pretrained=False, **kwargs):
    """Visformer-Tiny: 10.3M params, 78.6 top-1 (paper)."""
    return _create('visformer_tiny', pretrained, **kwargs)


@_register
def visformer_small(pretrained=False, **kwargs):
    """Visformer-Small: 40.2M params, 82.2 top-1 (paper)."""
    return _create('visformer_small', pretrained, **kwargs)


@_register
def visformer_tiny_v2(pretrained=False, **kwargs):
    """Visformer-Tiny v2 (four stages): 79.6 top-1 (paper)."""
    return _create('visformer_tiny_v2', pretrained, **kwargs)


@_register
def visformer_small_v2(pretrained=False, **kwargs):
    """Visformer-Small v2 (four stages): 83.0 top-1 (paper)."""
    return _create('visformer_small_v2', pretrained, **kwargs)
