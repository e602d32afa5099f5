"""Visformer: The Vision-friendly Transformer (Chen et al., ICCV 2021, arXiv 2104.12533).

BatchNorm everywhere, convolutional bottleneck blocks in the high-resolution stages and
self-attention (1x1-conv projections) in the last two. v1 (`visformer_tiny`, `visformer_small`)
has three stages with timm's state-dict keys, so its weights load unchanged; v2 (MindCV's
`visformer_tiny_v2`, `visformer_small_v2`) has four. q and k are each scaled by
head_dim ** qk_scale_exponent before their product, which keeps fp16 logits in range.

Dense features (timm's `forward_intermediates` / `feature_info` / `features_only`) are the stage
outputs (v1: strides 8, 16, 32; v2: 4, 8, 16, 32); position embeddings are resized (bicubic) on the
fly for inputs of another size.
"""
import math
import warnings
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import get_pretrained_cfg, load_pretrained, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices

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
        q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.head_dim, H * W).permute(1, 0, 2, 4, 3)
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

    Stages are named from `first_stage` on (1 for v1, whose keys match timm's; 0 for v2).
    `attn_stage` / `spatial_conv` are per-stage '0'/'1' strings."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, init_channels=32, stage_dims=(192, 384, 768),
                 patch_sizes=(4, 2, 2), depths=(7, 4, 4), num_heads=(6, 6, 6), mlp_ratio=4., group=8,
                 attn_stage='011', spatial_conv='100', qk_scale_exponent=-0.25, first_stage=1, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0., pos_embed=True, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d):
        super().__init__()
        num_stages = len(stage_dims)
        if not (len(patch_sizes) == len(depths) == len(num_heads) == len(attn_stage) == len(spatial_conv)
                == num_stages):
            raise ValueError('stage_dims, patch_sizes, depths, num_heads, attn_stage and spatial_conv need one '
                             'entry per stage')
        stride = 2 * math.prod(patch_sizes)
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_h % stride or img_w % stride:
            raise ValueError(f'img_size {img_size} must be a multiple of {stride}')
        self.num_classes = num_classes
        self.num_features = stage_dims[-1]
        self.stage_ids = list(range(first_stage, first_stage + num_stages))
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
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    def _stage(self, sid, x):
        x = getattr(self, f'patch_embed{sid}')(x)
        pos_embed = getattr(self, f'pos_embed{sid}')
        if pos_embed is not None:
            if pos_embed.shape[2:] != x.shape[2:]:
                pos_embed = F.interpolate(pos_embed, size=x.shape[2:], mode='bicubic', align_corners=False)
            x = self.pos_drop(x + pos_embed)
        for blk in getattr(self, f'stage{sid}'):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_features(self, x):
        x = self.stem(x)
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
                delattr(self, name)
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

    def forward_head(self, x, pre_logits=False):
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.9,
            'interpolation': 'bicubic', 'fixed_input_size': True, 'mean': IMAGENET_DEFAULT_MEAN,
            'std': IMAGENET_DEFAULT_STD, 'first_conv': 'stem.0', 'classifier': 'head', **kwargs}


# timm's community weights for v1 (same keys), resolved before our names replace timm's entries
_TIMM_WEIGHTS = {}
for _name in ('visformer_tiny', 'visformer_small'):
    _cfg_timm = get_pretrained_cfg(_name)
    if _cfg_timm is not None:
        _TIMM_WEIGHTS[_name] = _cfg_timm.to_dict()

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
        if theirs is not None and ours is not None and theirs.ndim == 4 and theirs.shape[:2] == ours.shape[:2] \
                and theirs.shape != ours.shape:
            state_dict[key] = F.interpolate(theirs.float(), size=ours.shape[2:], mode='bicubic',
                                            align_corners=False).to(theirs.dtype)
    return state_dict


def _create(variant, pretrained=False, **kwargs):
    overlay = kwargs.pop('pretrained_cfg_overlay', None) or {}
    given_cfg = kwargs.pop('pretrained_cfg', None)  # a dict from timm's hf-hub: / local-dir: sources
    if hasattr(given_cfg, 'to_dict'):
        given_cfg = given_cfg.to_dict()
    cache_dir = kwargs.pop('cache_dir', None)
    source_args = kwargs.pop('pretrained_model_args', None)  # timm: a hub config's model_args, also in kwargs
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', None)
    feature_cfg = kwargs.pop('feature_cfg', None) or {}
    model = Visformer(**{**VARIANTS[variant], **kwargs})
    img_size = kwargs.get('img_size', 224)
    base = given_cfg if isinstance(given_cfg, dict) else _TIMM_WEIGHTS.get(variant, {})
    cfg = _cfg(**{**base, **overlay})
    cfg['input_size'] = (3, *((img_size, img_size) if isinstance(img_size, int) else img_size))
    cfg['architecture'] = variant  # timm's save_for_hf / push_to_hf_hub write it to config.json
    model.pretrained_cfg = model.default_cfg = cfg
    model.pretrained_model_args = source_args or {}
    if pretrained:
        # a local `file`, a `url` (cached by torch.hub) or timm's hub entry for v1
        if not (cfg.get('file') or cfg.get('url') or cfg.get('hf_hub_id') or cfg.get('source')):
            raise ValueError(f'{variant} has no released weights; train it with main.py')
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get('in_chans', 3), filter_fn=checkpoint_filter_fn, cache_dir=cache_dir)
    if features_only:
        indices = tuple(range(len(model.stage_ids))) if out_indices is None else out_indices
        return FeatureGetterNet(model, out_indices=indices, norm=feature_cfg.get('norm', False))
    return model


def _register(fn):
    # replaces timm's own v1 entries, whose keys and weights these models share
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
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
