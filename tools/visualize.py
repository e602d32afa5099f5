#!/usr/bin/env python3
"""Pictures of what a VOLO looks at, for one image: the outlook attention of a window, the class
attention over the patches, the dense (per-token) prediction of its aux_head, and (--token-labels)
the token labels it was trained with.

    python -m tools.visualize cat.jpg --checkpoint d1_224_84.2.pth.tar --out pictures/
    python -m tools.visualize cat.jpg --checkpoint output/train/RUN/ --at 5 7 --block 0 2 --out pictures/

The functions (outlook_window_weights, class_attention, dense_prediction, token_label_map) return the maps as
tensors for notebooks; the command draws them as PNGs with titles. The model, its size, crop and
class names are resolved as predict.py resolves them.
"""
import argparse
import logging
import os

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from layers.outlook_attention import OutlookAttention, pool_ceil
from models.volo import VOLO, ClassAttention

_logger = logging.getLogger('visualize')
TOKEN_STRIDE = 16  # pixels per token of VOLO's transformer and class-attention stages


def _capture_inputs(model, kind, run):
    """The inputs of every `kind` module of `model` while `run()` runs, in call order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda module, inputs: seen.append((module, inputs[0].detach())))
             for m in model.modules() if isinstance(m, kind)]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def outlook_window_weights(model: VOLO, image: torch.Tensor, block=(0, 0)):
    """Outlook attention of the outlooker block `block` = (stage, index) for one normalised image
    (C, H, W): a tensor (rows, cols, heads, k*k, k*k) on the block's pooled grid, the weights with
    which each of a window's k*k output cells gathers the window's k*k cells (each row sums to 1),
    and the block's stride on the image (pixels per cell of its input map)."""
    target = model.network[block[0]][block[1]].attn
    if not isinstance(target, OutlookAttention):
        raise ValueError(f'block {block} is not an outlooker block')
    model.eval()
    captured = [x for module, x in _capture_inputs(model, OutlookAttention, lambda: model(image[None]))
                if module is target]
    x = captured[0]
    k, s = target.kernel_size, target.stride
    pooled = pool_ceil(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
    with torch.no_grad():
        logits = target.attn(pooled).reshape(*pooled.shape[1:3], target.num_heads, k * k, k * k)
    pixels_per_cell = image.shape[-1] // x.shape[2]
    return (logits * target.scale).softmax(-1), pixels_per_cell


def class_attention(model: VOLO, image: torch.Tensor):
    """The class token's attention in each class-attention block for one normalised image: a list
    (one per block) of (heads, 1 + N) tensors, each row summing to 1 (index 0 the class token
    itself, then the N patches in row-major order), and the patch grid (rows, cols)."""
    model.eval()
    maps = []
    for module, x in _capture_inputs(model, ClassAttention, lambda: model(image[None])):
        with torch.no_grad():
            B, N, _ = x.shape
            k, _ = module.kv(x).reshape(B, N, 2, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = module.q(x[:, :1]).reshape(B, 1, module.num_heads, module.head_dim).transpose(1, 2)
            maps.append(((q @ k.transpose(-2, -1)) * module.scale).softmax(-1)[0, :, 0])
    return maps, (image.shape[-2] // TOKEN_STRIDE, image.shape[-1] // TOKEN_STRIDE)


def dense_prediction(model: VOLO, image: torch.Tensor):
    """Per-token class probabilities of the aux_head for one normalised image: (rows, cols,
    classes), each token's row summing to 1; and the image-level probabilities (classes,)."""
    if model.aux_head is None or model.post_network is None:
        raise ValueError('the model has no dense head (aux_head) to draw')
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(image[None])
        dense = model.aux_head(tokens[:, 1:]).softmax(-1)[0]
        overall = model.forward_head(tokens).softmax(-1)[0]
    rows = image.shape[-2] // TOKEN_STRIDE
    return dense.reshape(rows, -1, dense.shape[-1]), overall


def token_label_map(path, num_classes=None):
    """The top class and its score per token of a token-label file (tlt's (2, 5, H, W) maps,
    checked as training checks them): two (H, W) tensors."""
    from data import load_label_map
    label = load_label_map(path, num_classes)
    return label[1, 0].long(), label[0, 0].float()


def draw_token_labels(image_path, classes, scores, names, path):
    """A training image beside its token labels: the top class per token and its score."""
    from PIL import Image
    fig, axes = _figure(1, 3, figsize=(10, 3.4))
    with Image.open(image_path) as img:
        axes[0].imshow(img.convert('RGB'))
    axes[0].set_title('training image', fontsize=8)
    cmap = matplotlib.colormaps['tab10']
    present = sorted(set(classes.flatten().tolist()))
    axes[1].imshow(np.array([cmap(c % 10)[:3] for c in range(max(present) + 1)])[classes.numpy()],
                   interpolation='nearest')
    axes[1].legend([Rectangle((0, 0), 1, 1, color=cmap(c % 10)[:3]) for c in present[:10]],
                   [str(names[c]) if names else str(c) for c in present[:10]], fontsize=7, loc='upper center',
                   bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    axes[1].set_title('top class per token', fontsize=8)
    shown = axes[2].imshow(scores.numpy(), cmap='viridis', interpolation='nearest')
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    axes[2].set_title('its score', fontsize=8)
    for ax in axes:
        ax.axis('off')
    fig.suptitle(f'Token labels: {os.path.basename(image_path)}', fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches='tight')


def _figure(rows, cols, figsize, squeeze=True):
    """(figure, axes) drawn off-screen: matplotlib's Figure directly, so that drawing changes no
    pyplot state or backend of the caller (a notebook keeps its own)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _unnormalise(image, mean, std):
    pixels = image.permute(1, 2, 0).numpy() * np.asarray(std) + np.asarray(mean)
    return np.clip(pixels, 0, 1)


def draw_outlook(image, weights, pixels_per_cell, at, mean, std, path, block):
    """Each head's weights of the centre cell of the window at pooled cell `at`, drawn over the
    image at the window's cells."""
    rows, cols, heads, kk, _ = weights.shape
    k = int(round(kk ** 0.5))
    r, c = at
    centre = weights[r, c, :, kk // 2].reshape(heads, k, k)
    stride = pixels_per_cell * (image.shape[-1] // pixels_per_cell // cols)
    fig, axes = _figure(1, heads, figsize=(2.2 * heads, 2.6), squeeze=False)
    pixels = _unnormalise(image, mean, std)
    for h in range(heads):
        ax = axes[0, h]
        ax.imshow(pixels)
        overlay = np.zeros(pixels.shape[:2])
        for i in range(k):
            for j in range(k):
                y = (r * stride // pixels_per_cell + i - k // 2) * pixels_per_cell
                x = (c * stride // pixels_per_cell + j - k // 2) * pixels_per_cell
                if 0 <= y < pixels.shape[0] and 0 <= x < pixels.shape[1]:
                    overlay[y:y + pixels_per_cell, x:x + pixels_per_cell] = float(centre[h, i, j])
        ax.imshow(np.ma.masked_equal(overlay, 0), cmap='magma', alpha=0.7, vmin=0, vmax=float(centre[h].max()))
        ax.set_title(f'head {h}', fontsize=8)
        ax.axis('off')
    fig.suptitle(f'Outlook attention, block {block}, window at cell {tuple(at)}: what its centre gathers', fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches='tight')


def draw_class_attention(image, maps, grid, mean, std, path):
    fig, axes = _figure(1, len(maps), figsize=(3 * len(maps), 3.2), squeeze=False)
    pixels = _unnormalise(image, mean, std)
    for b, attention in enumerate(maps):
        heat = attention[:, 1:].mean(0).reshape(grid)
        heat = F.interpolate(heat[None, None], size=pixels.shape[:2], mode='nearest')[0, 0].numpy()
        axes[0, b].imshow(pixels)
        axes[0, b].imshow(heat, cmap='jet', alpha=0.5)
        axes[0, b].set_title(f'class-attention block {b} (mean of heads)', fontsize=8)
        axes[0, b].axis('off')
    fig.suptitle('Where the class token looks', fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches='tight')


def draw_dense(image, dense, overall, names, mean, std, path, top=5):
    pixels = _unnormalise(image, mean, std)
    confidence, label = dense.max(-1)
    shown = overall.topk(min(top, overall.numel())).indices.tolist()
    fig, axes = _figure(1, 3, figsize=(11, 3.6))
    axes[0].imshow(pixels)
    axes[0].set_title('image', fontsize=8)
    cmap = matplotlib.colormaps['tab10']
    colours = np.array([cmap(i % 10)[:3] for i in range(int(label.max()) + 1)])
    axes[1].imshow(colours[label.numpy()], interpolation='nearest')
    axes[1].set_title('per-token top class (aux_head)', fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=colours[c]) for c in sorted(set(label.flatten().tolist()))[:10]]
    axes[1].legend(handles, [str(names[c]) if names else str(c) for c in sorted(set(label.flatten().tolist()))[:10]],
                   fontsize=7, loc='upper center', bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    axes[2].barh(range(len(shown))[::-1], [float(overall[c]) for c in shown])
    axes[2].set_yticks(range(len(shown))[::-1], [str(names[c]) if names else str(c) for c in shown], fontsize=7)
    axes[2].set_xlim(0, 1)
    axes[2].set_title('image-level top classes', fontsize=8)
    for ax in axes[:2]:
        ax.axis('off')
    fig.suptitle(f'Dense prediction: mean token confidence {float(confidence.mean()):.2f}', fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches='tight')


def parse_args(argv=None):
    from validate import add_model_options
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('image')
    p.add_argument('--checkpoint', default='')
    add_model_options(p)
    p.add_argument('--out', required=True, metavar='DIR')
    p.add_argument('--block', type=int, nargs=2, default=(0, 0), metavar=('STAGE', 'INDEX'),
                   help='the outlooker block (stage 0: the outlookers)')
    p.add_argument('--at', type=int, nargs=2, default=None, metavar=('ROW', 'COL'),
                   help="the window's cell on the block's pooled grid (default: the centre)")
    p.add_argument('--token-labels', default='', metavar='FILE',
                   help="also draw this token-label file (tlt's .pt) of the image")
    p.add_argument('--device', default='cpu')
    return p.parse_args(argv)


def main(argv=None):
    from data import eval_transform
    from engine import check_writable_folder, select_device
    from predict import class_names
    from utils import read_checkpoint
    from utils.log import setup_logging
    from validate import build_classifier
    from PIL import Image
    setup_logging()
    args = parse_args(argv)
    check_writable_folder(args.out, '--out')
    device = select_device(args.device)
    contents = read_checkpoint(args.checkpoint, use_ema=args.use_ema) if args.checkpoint else None
    model, config, _ = build_classifier(args, args.checkpoint, contents, device)
    names = class_names(contents, model.num_classes)
    size = config['input_size'][-1]
    with Image.open(args.image) as img:
        pixels = eval_transform(size, config['crop_pct'], config['interpolation'])(img.convert('RGB'))
    mean, std = config['mean'], config['std']
    image = (pixels.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    written = []
    weights, pixels_per_cell = outlook_window_weights(model, image, tuple(args.block))
    at = args.at or (weights.shape[0] // 2, weights.shape[1] // 2)
    written.append(os.path.join(args.out, 'outlook_attention.png'))
    draw_outlook(image, weights, pixels_per_cell, at, mean, std, written[-1], tuple(args.block))
    maps, grid = class_attention(model, image)
    written.append(os.path.join(args.out, 'class_attention.png'))
    draw_class_attention(image, maps, grid, mean, std, written[-1])
    dense, overall = dense_prediction(model, image)
    written.append(os.path.join(args.out, 'dense_prediction.png'))
    draw_dense(image, dense, overall, names, mean, std, written[-1])
    if args.token_labels:
        classes, scores = token_label_map(args.token_labels, model.num_classes)
        written.append(os.path.join(args.out, 'token_labels.png'))
        draw_token_labels(args.image, classes, scores, names, written[-1])
    for path in written:
        _logger.info('wrote %s', path)
    return written


if __name__ == '__main__':
    main()
