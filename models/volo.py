"""VOLO: Vision Outlooker for Visual Recognition (Yuan et al., arXiv 2106.13112).

State-dict keys and shapes match the released checkpoints. Feature maps are channels-last
(B, H, W, C) between blocks, as in the reference. Outlook attention lives in layers/.

Dense features (timm's `forward_intermediates` / `feature_info` / `features_only`) are the outputs
of the four stages: the outlooker stage at stride 8 and the three transformer stages at stride 16.
Any input whose sides are multiples of 16 works: pos_embed is resized (bicubic) on the fly.

`model(x)` returns logits in train and eval mode alike, as timm's VOLO does; `forward_train(x)`
returns the token-labeling triple (class logits, dense logits, MixToken box), which main.py asks for.
The model scripts (TorchScript: plain paths, no custom autograd functions) and traces (FX: the
fused and shape-dependent parts are single calls), with the outputs of eager mode.
"""
import math
from functools import partial
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from layers import (ModelHooks, OutlookAttention, check_model_arguments, exporting, needs_grad, register_model_hooks,
                    resize_pos_embed)
from layers import OUTLOOK_IMPLS, outlook_aggregate  # noqa: F401  (their names in models.volo before layers/)

from ._builder import pretrained_overlay

__all__ = ['VOLO', 'DenseTrainingForward', 'volo_d1', 'volo_d2', 'volo_d3', 'volo_d4', 'volo_d5']


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias) that keeps only h for backward and recomputes gelu(h) there:
    one hidden-size activation less per MLP (a sixth of VOLO-D1's training activations)."""

    @staticmethod
    def forward(ctx, h, weight, bias, approximate='none'):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        ctx.approximate = approximate
        return F.linear(F.gelu(h, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        a = F.gelu(h, approximate=ctx.approximate)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = (grad_2d.t() @ a.reshape(-1, a.shape[-1]).to(grad.dtype)).to(weight.dtype)
        grad_bias = grad_2d.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_a = grad @ weight.to(grad.dtype)
        # the aten op: torch.compile traces it
        grad_h = torch.ops.aten.gelu_backward(grad_a.to(h.dtype), h, approximate=ctx.approximate)
        return grad_h, grad_weight, grad_bias, None


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str = 'none'):
    """linear(gelu(h), weight, bias); when h needs a gradient, gelu(h) is recomputed in backward
    instead of stored."""
    if torch.jit.is_scripting():  # an FX graph being scripted calls this function
        return F.linear(F.gelu(h, approximate=approximate), weight, bias)
    else:
        if needs_grad(h):
            return _GeluLinear.apply(h, weight, bias, approximate)
        return F.linear(F.gelu(h, approximate=approximate), weight, bias)


# FX: one call in traced graphs (its autograd function is chosen when the graph runs)
register_notrace_function(gelu_linear)
torch.fx.wrap('gelu_linear')
torch.fx.wrap('resize_pos_embed')


class Mlp(nn.Module):
    """fc1, GELU, fc2 (the reference's keys); in training, GELU's output is recomputed in backward.
    act_layer: a GELU (exact or tanh-approximated) or any other activation (then stored as usual)."""

    def __init__(self, in_features, hidden_features, drop=0., act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        h = self.fc1(x)
        if torch.jit.is_scripting():
            return self.drop(self.fc2(self.drop(self.act(h))))
        if isinstance(self.act, nn.GELU) and not self.drop.p:  # recomputed in backward
            return self.drop(gelu_linear(h, self.fc2.weight, self.fc2.bias, self.act.approximate))
        return self.drop(self.fc2(self.drop(self.act(h))))


class Outlooker(nn.Module):
    def __init__(self, dim, kernel_size, padding, stride=1, num_heads=1, mlp_ratio=3., attn_drop=0.,
                 drop_path=0., norm_layer=nn.LayerNorm, qkv_bias=False,
                 qk_scale=None, outlook_impl='auto', act_layer=nn.GELU):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = OutlookAttention(dim, num_heads, kernel_size=kernel_size, padding=padding,
                                     stride=stride, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                     attn_drop=attn_drop, outlook_impl=outlook_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(x)


class Transformer(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, attn_drop=0.,
                 drop_path=0., norm_layer=nn.LayerNorm, act_layer=nn.GELU):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """CaiT-style class attention: the class token queries all tokens."""

    def __init__(self, dim, num_heads=8, head_dim=None, qkv_bias=False, qk_scale=None, attn_drop=0.,
                 proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kv = nn.Linear(dim, self.head_dim * num_heads * 2, bias=qkv_bias)
        self.q = nn.Linear(dim, self.head_dim * num_heads, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, _ = x.shape
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        cls = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        cls = self.proj(cls.transpose(1, 2).reshape(B, 1, self.head_dim * self.num_heads))
        return self.proj_drop(cls)


class ClassBlock(nn.Module):
    """Updates the class token only; patch tokens pass through."""

    def __init__(self, dim, num_heads, head_dim=None, mlp_ratio=4., qkv_bias=False, qk_scale=None,
                 drop=0., attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm, act_layer=nn.GELU):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                                   qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, act_layer=act_layer)

    def forward(self, x):
        cls = x[:, :1]
        cls = cls + self.drop_path(self.attn(self.norm1(x)))
        cls = cls + self.drop_path(self.mlp(self.norm2(cls)))
        return torch.cat([cls, x[:, 1:]], dim=1)


class PatchEmbed(nn.Module):
    """Three-conv stem at stride 2, then a patch projection: total stride patch_size."""

    def __init__(self, patch_size=8, in_chans=3, hidden_dim=64, embed_dim=384):
        super().__init__()
        if patch_size not in (4, 8, 16):
            raise ValueError(f'patch_size must be 4, 8 or 16, got {patch_size}')
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x):
        # channels-last convs are faster on CPU and GPU, and make the NHWC permute after the stem free
        return self.proj(self.conv(x.contiguous(memory_format=torch.channels_last)))


class Downsample(nn.Module):
    """Channels-last patch merging: conv with kernel = stride = patch_size."""

    def __init__(self, in_embed_dim, out_embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_embed_dim, out_embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def rand_token_box(grid_h: int, grid_w: int, lam: float) -> Tuple[int, int, int, int]:
    """CutMix box on the token grid as (row1, col1, row2, col2), drawn from torch's RNG."""
    cut_rat = math.sqrt(1. - lam)
    cut_h, cut_w = int(grid_h * cut_rat), int(grid_w * cut_rat)
    cy = int(torch.randint(grid_h, (1,)))
    cx = int(torch.randint(grid_w, (1,)))
    row1, row2 = min(max(cy - cut_h // 2, 0), grid_h), min(max(cy + cut_h // 2, 0), grid_h)
    col1, col2 = min(max(cx - cut_w // 2, 0), grid_w), min(max(cx + cut_w // 2, 0), grid_w)
    return row1, col1, row2, col2


class VOLO(nn.Module):
    """Outlooker stage at stride 8, transformer stages at stride 16, two class-attention blocks.

    `model(x)` returns logits `head(cls) + 0.5 * max_tokens(aux_head(patches))` in both modes;
    `forward_train(x)` returns `(cls_logits, aux_logits, (row1, col1, row2, col2))` with the MixToken
    box on the token grid. global_pool: 'token' (the class token; the reference), 'avg' (mean of all
    tokens, no dense term; the old `return_mean=True`) or '' (the tokens, unpooled).
    """

    def __init__(self, layers, img_size=224, in_chans=3, num_classes=1000, patch_size=8,
                 stem_hidden_dim=64, embed_dims=None, num_heads=None, downsamples=None,
                 outlook_attention=None, mlp_ratios=None, qkv_bias=False, qk_scale=None, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0., norm_layer=nn.LayerNorm, post_layers=('ca', 'ca'),
                 return_mean=False, return_dense=True, mix_token=True, pooling_scale=2, out_kernel=3,
                 out_stride=2, out_padding=1, outlook_impl='auto', act_layer=nn.GELU, global_pool=None):
        super().__init__()
        check_model_arguments(img_size, num_classes, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                              drop_path_rate=drop_path_rate)
        if global_pool is None:
            global_pool = 'avg' if return_mean else 'token'
        _check_global_pool(global_pool, post_layers)
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        step = patch_size * pooling_scale
        if img_h % step or img_w % step:
            raise ValueError(f'img_size {img_size} must be a multiple of {step} (patch_size x pooling_scale)')
        if len({len(layers), len(embed_dims), len(num_heads), len(downsamples),
                len(outlook_attention), len(mlp_ratios)}) != 1:
            raise ValueError('layers, embed_dims, num_heads, downsamples, outlook_attention and '
                             'mlp_ratios must have one entry per stage')
        for post in post_layers or ():
            if post != 'ca':
                raise ValueError(f"post_layers entries must be 'ca' (class attention), got {post!r}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.global_pool = global_pool
        self.return_dense = return_dense
        self.mix_token = mix_token
        self.beta = 1.0
        self.pooling_scale = pooling_scale
        self.grad_checkpointing = False
        if mix_token and not return_dense:
            raise ValueError('mix_token needs return_dense=True: the dense predictions are un-mixed')

        self.patch_embed = PatchEmbed(patch_size, in_chans, stem_hidden_dim, embed_dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, img_h // step, img_w // step, embed_dims[-1]))
        self.pos_drop = nn.Dropout(p=drop_rate)

        total_blocks = sum(layers)
        network = []
        for i, depth in enumerate(layers):
            blocks = []
            for j in range(depth):
                if outlook_attention[i]:
                    blocks.append(Outlooker(
                        embed_dims[i], kernel_size=out_kernel, padding=out_padding, stride=out_stride,
                        num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                        qk_scale=qk_scale, attn_drop=attn_drop_rate, norm_layer=norm_layer,
                        outlook_impl=outlook_impl, act_layer=act_layer))
                else:
                    dpr = drop_path_rate * (j + sum(layers[:i])) / max(total_blocks - 1, 1)
                    blocks.append(Transformer(
                        embed_dims[i], num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                        qk_scale=qk_scale, attn_drop=attn_drop_rate, drop_path=dpr,
                        norm_layer=norm_layer, act_layer=act_layer))
            network.append(nn.Sequential(*blocks))
            if downsamples[i]:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], 2))
        self.network = nn.ModuleList(network)
        self.stage_ends = [i for i, m in enumerate(self.network) if isinstance(m, nn.Sequential)]
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=patch_size * (1 if i == 0 else 2),
                                  module=f'network.{end}') for i, end in enumerate(self.stage_ends)]
        self.pruned = ()  # state-dict prefixes removed by prune_intermediate_layers

        self.post_network = None
        if post_layers:
            self.post_network = nn.ModuleList([
                ClassBlock(embed_dims[-1], num_heads[-1], mlp_ratio=mlp_ratios[-1], qkv_bias=qkv_bias,
                           qk_scale=qk_scale, attn_drop=attn_drop_rate, norm_layer=norm_layer,
                           act_layer=act_layer)
                for _ in post_layers])
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
            trunc_normal_(self.cls_token, std=.02)

        self.aux_head = None
        if return_dense:
            self.aux_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)
        self.apply(self._init_weights)

    __jit_unused_properties__ = ['return_mean']

    @property
    def return_mean(self):
        """The old name of global_pool='avg'."""
        return self.global_pool == 'avg'

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """Replace both heads (class token and dense) for a new class count; 0 removes them (the
        model then returns the pooled features). global_pool: as in the constructor."""
        if global_pool is not None:
            _check_global_pool(global_pool, () if self.post_network is None else ('ca',))
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.aux_head is not None:
            self.aux_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in (self.head, self.aux_head):
            if m is not None:
                self._init_weights(m)

    def _run(self, blocks, x):
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _add_pos_embed(self, x):
        """x (B, H, W, C) plus pos_embed, resized (bicubic) when the grid is not the built one."""
        return self.pos_drop(x + resize_pos_embed(self.pos_embed, x.shape[1:3]))

    def forward_tokens(self, x):
        """Stem output (B, H, W, C) -> normed tokens (B, [1 +] N, C)."""
        for idx, stage in enumerate(self.network):
            if idx == 2:  # after the downsample: position embedding, then tokens
                x = self._add_pos_embed(x)
                x = x.flatten(1, 2)
            if not torch.jit.is_scripting() and self.grad_checkpointing and isinstance(stage, nn.Sequential):
                x = self._run(stage, x)
            else:
                x = stage(x)
        if len(self.network) <= 2:  # a pruned model whose maps never became tokens
            x = x.flatten(1, 2)
        if self.post_network is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            if not torch.jit.is_scripting() and self.grad_checkpointing:
                x = self._run(self.post_network, x)
            else:
                for blk in self.post_network:
                    x = blk(x)
        return self.norm(x)

    def forward_features(self, x):
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        return self.forward_tokens(x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False):
        """Stage outputs as (B, C, H, W) maps (timm's convention). indices: the stages to return
        (0 = outlooker at stride 8, 1-3 = transformer stages at stride 16), an int n for the last n,
        None for all. norm: the final LayerNorm on the transformer stages' maps. Returns the list,
        or (final tokens, list) unless intermediates_only."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_ends = {self.stage_ends[i] for i in take}
        last = self.stage_ends[max_index] if stop_early or intermediates_only else len(self.network) - 1
        intermediates = []
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        for idx, stage in enumerate(self.network[:last + 1]):
            if idx == 2:
                x = self._add_pos_embed(x)
            grid = x.shape[:3]
            if idx >= 2:  # transformer blocks act on (B, N, C) tokens
                x = self._run(stage, x.flatten(1, 2)).reshape(*grid, -1)
            else:
                x = self._run(stage, x) if isinstance(stage, nn.Sequential) else stage(x)
            if idx in take_ends:
                feat = self.norm(x) if norm and idx >= 2 else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else feat)
        if intermediates_only:
            return intermediates
        x = x.flatten(1, 2)
        if self.post_network is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self._run(self.post_network, x)
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop what the given stage outputs do not need (later stages, class attention and heads,
        the final norm); a checkpoint's keys for those parts are then ignored by
        checkpoint_filter_fn. Returns the kept indices."""
        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        end = self.stage_ends[max_index]
        pruned = [f'network.{i}.' for i in range(end + 1, len(self.network))]
        self.network = self.network[:end + 1]
        self.stage_ends = self.stage_ends[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if end < 2:
            self.pos_embed = None
            pruned.append('pos_embed')
        if prune_head:
            self.post_network, self.cls_token, self.aux_head = None, None, None
            self.head = nn.Identity()
            pruned += ['post_network.', 'cls_token', 'aux_head.', 'head.']
        if prune_norm or end < len(self.stage_ends) - 1:
            self.norm = nn.Identity()
            pruned.append('norm.')
        self.pruned = tuple(sorted(set(self.pruned) | set(pruned)))
        return take

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == 'avg':
            x = x.mean(1)
            return x if pre_logits else self.head(x)
        if self.global_pool == '':
            return x if pre_logits else self.head(x)
        if self.post_network is None:
            raise ValueError("without class-attention blocks the model has no class token: build it with "
                             "global_pool='avg'")
        cls = x[:, 0]
        if pre_logits:
            return cls
        logits = self.head(cls)
        if self.aux_head is not None and self.num_classes > 0:
            aux = self.aux_head(x[:, 1:])
            if torch.jit.is_scripting():
                best = aux.amax(dim=1)
            else:
                # TopK exports to ONNX opset 17; ReduceMax from the opset-18 exporter does not convert down
                best = aux.topk(1, dim=1).values[:, 0] if exporting() else aux.amax(dim=1)
            logits = logits + 0.5 * best
        return logits

    @torch.jit.ignore
    def forward_train(self, x):
        """Class logits, dense logits of every token, and the MixToken box (zeros when off): the
        training output of token labeling (main.py). `model(x)` gives the logits instead."""
        if self.aux_head is None or self.post_network is None:
            raise ValueError('forward_train needs the class token and the dense head (return_dense=True, '
                             'class-attention blocks); this model returns logits only: use model(x)')
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        grid_h, grid_w = x.shape[1] // self.pooling_scale, x.shape[2] // self.pooling_scale
        box = (0, 0, 0, 0)
        if self.mix_token:
            lam = float(torch.distributions.Beta(self.beta, self.beta).sample())
            box = rand_token_box(grid_h, grid_w, lam)
            r1, c1, r2, c2 = (b * self.pooling_scale for b in box)
            mixed = x.clone()
            mixed[:, r1:r2, c1:c2] = x.flip(0)[:, r1:r2, c1:c2]
            x = mixed
        x = self.forward_tokens(x)
        cls_logits = self.head(x[:, 0])
        aux = self.aux_head(x[:, 1:])
        if self.mix_token:
            r1, c1, r2, c2 = box
            aux = aux.reshape(aux.shape[0], grid_h, grid_w, aux.shape[-1])
            unmixed = aux.clone()
            unmixed[:, r1:r2, c1:c2] = aux.flip(0)[:, r1:r2, c1:c2]
            aux = unmixed.reshape(aux.shape[0], grid_h * grid_w, aux.shape[-1])
        return cls_logits, aux, box

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class DenseTrainingForward(nn.Module):
    """A VOLO whose forward is forward_train (class logits, dense logits, MixToken box) in training
    and the logits in evaluation: for DDP and torch.compile, which see only forward (main.py's
    token-labeling training, tools/benchmark.py). Its `module` attribute is the one timm's
    unwrap_model and the checkpoint saver look through, so checkpoints keep the model's keys."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module.forward_train(x) if self.training else self.module(x)


def _check_global_pool(global_pool, post_layers):
    if global_pool not in ('token', 'avg', ''):
        raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
    if global_pool == 'token' and not post_layers:
        raise ValueError("global_pool='token' needs the class-attention blocks (post_layers); use 'avg'")


def _release(file, variant, img_size, crop_pct):
    return {
        'url': f'https://github.com/sail-sg/volo/releases/download/volo_1/{file}',
        # timm's Hugging Face copy of the same file (the reference's keys; checkpoint_filter_fn reads both)
        'hf_hub_id': f'timm/{variant}_{img_size}.sail_in1k',
        'num_classes': 1000, 'input_size': (3, img_size, img_size), 'pool_size': None,
        'crop_pct': crop_pct, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.conv.0', 'classifier': ('head', 'aux_head'), 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2106.13112', 'origin_url': 'https://github.com/sail-sg/volo',
    }


def release_tag(img_size):
    """The pretrained tag of the release at `img_size`: 'sail_in1k' at 224, 'sail_in1k_<res>' else."""
    return 'sail_in1k' if img_size == 224 else f'sail_in1k_{img_size}'


# released ImageNet-1k weights per variant and resolution: (file, crop_pct as independently re-evaluated)
_RELEASE_FILES = {
    'volo_d1': {224: ('d1_224_84.2.pth.tar', 0.96), 384: ('d1_384_85.2.pth.tar', 1.0)},
    'volo_d2': {224: ('d2_224_85.2.pth.tar', 0.96), 384: ('d2_384_86.0.pth.tar', 1.0)},
    'volo_d3': {224: ('d3_224_85.4.pth.tar', 0.96), 448: ('d3_448_86.3.pth.tar', 1.0)},
    'volo_d4': {224: ('d4_224_85.7.pth.tar', 0.96), 448: ('d4_448_86.79.pth.tar', 1.15)},
    'volo_d5': {224: ('d5_224_86.10.pth.tar', 0.96), 448: ('d5_448_87.0.pth.tar', 1.15),
                512: ('d5_512_87.07.pth.tar', 1.15)},
}
# their pretrained cfgs, per variant and resolution
RELEASES = {variant: {res: _release(file, variant, res, crop) for res, (file, crop) in sizes.items()}
            for variant, sizes in _RELEASE_FILES.items()}

# timm's pretrained registry: `volo_d1.sail_in1k` (224), `volo_d1.sail_in1k_384`, ...; the 224
# release is each variant's default
default_cfgs = generate_default_cfgs({
    f'{variant}.{release_tag(res)}': cfg for variant, sizes in RELEASES.items() for res, cfg in sizes.items()})

VARIANTS = {
    'volo_d1': dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12),
                    mlp_ratios=(3, 3, 3, 3), stem_hidden_dim=64),
    'volo_d2': dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16),
                    mlp_ratios=(3, 3, 3, 3), stem_hidden_dim=64),
    'volo_d3': dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16),
                    mlp_ratios=(3, 3, 3, 3), stem_hidden_dim=64),
    'volo_d4': dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
                    mlp_ratios=(3, 3, 3, 3), stem_hidden_dim=64),
    'volo_d5': dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
                    mlp_ratios=(4, 4, 4, 4), stem_hidden_dim=128),
}


def _release_choice(variant, img_size, pretrained_cfg):
    """The pretrained tag (or the cfg itself) a VOLO is built with: a given tag (the old spelling
    'sail_in1k_224' included) or cfg as given, else the release nearest to `img_size` (its pos_embed
    is resized to the requested grid)."""
    releases = RELEASES[variant]
    if isinstance(pretrained_cfg, str):
        tags = {release_tag(res): res for res in releases}
        tag = 'sail_in1k' if pretrained_cfg == 'sail_in1k_224' else pretrained_cfg
        if tag not in tags:
            raise ValueError(f'{variant} has no release tag {pretrained_cfg!r}; known: {sorted(tags)}')
        return tag
    if pretrained_cfg:
        return pretrained_cfg
    size = 224 if img_size is None else img_size if isinstance(img_size, int) else max(img_size)
    return release_tag(min(releases, key=lambda r: (abs(r - size), r)))


# MindCV's numerics (mindcv.md §3): tanh-approximated GELU, LayerNorm eps 1e-7, and logits from the
# class token only (its aux_head was never trained; no MixToken)
MINDCV_NUMERICS = dict(act_layer=partial(nn.GELU, approximate='tanh'), norm_layer=partial(nn.LayerNorm, eps=1e-7),
                       return_dense=False, mix_token=False)


def _volo_signature(shapes):
    """(stem width, first dim, last dim, blocks per stage, MLP ratio) of a VOLO-like state dict."""
    if 'patch_embed.conv.0.weight' not in shapes or 'network.0.0.norm1.weight' not in shapes:
        return None
    stages = tuple(len({k.split('.')[2] for k in shapes if k.startswith(f'network.{stage}.')
                        and k.endswith('norm1.weight')}) for stage in (0, 2, 3, 4))
    fc1 = shapes.get('network.0.0.mlp.fc1.weight', (0, 1))
    last_stage = max(int(k.split('.')[1]) for k in shapes if k.startswith('network.') and k.endswith('norm1.weight'))
    last_dim = shapes.get('norm.weight', shapes[f'network.{last_stage}.0.norm1.weight'])[0]
    return (shapes['patch_embed.conv.0.weight'][0], shapes['network.0.0.norm1.weight'][0],
            last_dim, stages, fc1[0] // fc1[1])


def checkpoint_variant(state_dict):
    """The VOLO variant whose layout a state dict has, or a description of what it is."""
    sig = _volo_signature({k: tuple(v.shape) for k, v in state_dict.items()})
    if sig is None:
        return None
    for name, cfg in VARIANTS.items():
        if sig == (cfg['stem_hidden_dim'], cfg['embed_dims'][0], cfg['embed_dims'][-1], tuple(cfg['layers']),
                   cfg['mlp_ratios'][0]):
            return name
    return f'an unknown VOLO layout (stem {sig[0]}, dims {sig[1]}/{sig[2]}, blocks {sig[3]})'


def checkpoint_filter_fn(state_dict, model):
    """A checkpoint's state dict adapted to `model`: `module.` stripped, the parts a pruned model
    (features only) or a class-token-only model (no aux_head) does not have dropped, pos_embed resized (bicubic) to the model's token grid.
    Class-count handling is the loader's."""
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if getattr(model, 'pruned', ()):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(model.pruned)}
    if getattr(model, 'aux_head', None) is None:  # a class-token-only model (return_dense=False)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('aux_head.')}
    theirs, ours = state_dict.get('pos_embed'), getattr(model, 'pos_embed', None)
    if theirs is not None and ours is not None and theirs.ndim == ours.ndim == 4 and theirs.shape[-1] == ours.shape[-1]:
        state_dict['pos_embed'] = resize_pos_embed(theirs, ours.shape[1:3])
    return state_dict


def _create_volo(variant, pretrained=False, **kwargs):
    img_size = kwargs.get('img_size')
    overlay = pretrained_overlay(img_size, kwargs.pop('pretrained_cfg_overlay', None))  # checks img_size first
    pretrained_cfg = _release_choice(variant, img_size, kwargs.pop('pretrained_cfg', None))
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', (0, 1, 2, 3)), feature_cls='getter',
                       **(kwargs.pop('feature_cfg', None) or {}))
    model_args = dict(VARIANTS[variant], downsamples=(True, False, False, False),
                      outlook_attention=(True, False, False, False))
    return build_model_with_cfg(
        VOLO, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **dict(model_args, **kwargs))


register_model_hooks(VOLO, ModelHooks(checkpoint_filter_fn, checkpoint_variant, tuple(VARIANTS)))


@register_model
def volo_d1(pretrained=False, **kwargs):
    """VOLO-D1: 26.6M params, 84.2 top-1 at 224 (85.2 at 384)."""
    return _create_volo('volo_d1', pretrained, **kwargs)


@register_model
def volo_d2(pretrained=False, **kwargs):
    """VOLO-D2: 58.7M params, 85.2 top-1 at 224 (86.0 at 384)."""
    return _create_volo('volo_d2', pretrained, **kwargs)


@register_model
def volo_d3(pretrained=False, **kwargs):
    """VOLO-D3: 86.3M params, 85.4 top-1 at 224 (86.3 at 448)."""
    return _create_volo('volo_d3', pretrained, **kwargs)


@register_model
def volo_d4(pretrained=False, **kwargs):
    """VOLO-D4: 193.0M params, 85.7 top-1 at 224 (86.8 at 448)."""
    return _create_volo('volo_d4', pretrained, **kwargs)


@register_model
def volo_d5(pretrained=False, **kwargs):
    """VOLO-D5: 295.5M params, 86.1 top-1 at 224 (87.0 at 448, 87.1 at 512)."""
    return _create_volo('volo_d5', pretrained, **kwargs)
