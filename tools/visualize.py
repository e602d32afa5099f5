#!/usr/bin/env python3
"""Pictures of what a VOLO or a Visformer looks at, for one image. VOLO: the outlook attention of a
window, the class attention over the patches, the dense (per-token) prediction of its aux_head and
(--token-labels) the token labels it was trained with. Visformer: the attention of one query cell
in every attention block. Both: a Grad-CAM class activation map (pytorch-grad-cam).

    python -m tools.visualize cat.jpg --checkpoint d1_224_84.2.pth.tar --out pictures/
    python -m tools.visualize cat.jpg --checkpoint output/train/RUN/ --at 5 7 --block 0 2 --out pictures/
    python -m tools.visualize cat.jpg --model visformer_small --pretrained --out pictures/

The functions (outlook_window_weights, class_attention, dense_prediction, token_label_map,
visformer_attention, class_activation_map) return the maps as tensors for notebooks; the command
draws them as PNGs with titles. The model, its size, crop and class names are resolved as
predict.py resolves them.
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
from models.visformer import Attention as VisformerAttention
from models.visformer import Visformer
from models.volo import VOLO, ClassAttention, Transformer
from engine.files import save_figure

_logger = logging.getLogger('visualize')
TOKEN_STRIDE = 16  # pixels per token of VOLO's transformer and class-attention stages


def _on_model(model, image):
    """One image as a batch of one on the model's device."""
    return image[None].to(next(model.parameters()).device)


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
    try:
        target = model.network[block[0]][block[1]].attn
    except (IndexError, TypeError, AttributeError):  # no such stage or block, or a downsampling layer
        target = None
    if not isinstance(target, OutlookAttention):
        raise ValueError(f'block {block} is not an outlooker block (--block 0 I, I < {len(model.network[0])})')
    model.eval()
    captured = [x for module, x in _capture_inputs(model, OutlookAttention, lambda: model(_on_model(model, image)))
                if module is target]
    x = captured[0]
    k, s = target.kernel_size, target.stride
    pooled = pool_ceil(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
    with torch.no_grad():
        logits = target.attn(pooled).reshape(*pooled.shape[1:3], target.num_heads, k * k, k * k)
    pixels_per_cell = image.shape[-1] // x.shape[2]
    return (logits * target.scale).softmax(-1).cpu(), pixels_per_cell


def class_attention(model: VOLO, image: torch.Tensor):
    """The class token's attention in each class-attention block for one normalised image: a list
    (one per block) of (heads, 1 + N) tensors, each row summing to 1 (index 0 the class token
    itself, then the N patches in row-major order), and the patch grid (rows, cols)."""
    model.eval()
    maps = []
    for module, x in _capture_inputs(model, ClassAttention, lambda: model(_on_model(model, image))):
        with torch.no_grad():
            B, N, _ = x.shape
            k, _ = module.kv(x).reshape(B, N, 2, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = module.q(x[:, :1]).reshape(B, 1, module.num_heads, module.head_dim).transpose(1, 2)
            maps.append(((q @ k.transpose(-2, -1)) * module.scale).softmax(-1)[0, :, 0].cpu())
    return maps, (image.shape[-2] // TOKEN_STRIDE, image.shape[-1] // TOKEN_STRIDE)


def dense_prediction(model: VOLO, image: torch.Tensor):
    """Per-token class probabilities of the aux_head for one normalised image: (rows, cols,
    classes), each token's row summing to 1; and the image-level probabilities (classes,)."""
    if model.aux_head is None or model.post_network is None:
        raise ValueError('the model has no dense head (aux_head) to draw')
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(_on_model(model, image))
        dense = model.aux_head(tokens[:, 1:]).softmax(-1)[0].cpu()
        overall = model.forward_head(tokens).softmax(-1)[0].cpu()
    rows = image.shape[-2] // TOKEN_STRIDE
    return dense.reshape(rows, -1, dense.shape[-1]), overall


def visformer_attention(model: Visformer, image: torch.Tensor, at=None):
    """The attention of one query cell in every attention block of a Visformer, for one normalised
    image (C, H, W): a list of (block name, (heads, h, w) weights over the block's h x w grid, each
    head's summing to 1, the query's (row, col) on that grid). `at` is a cell of the last attention
    stage's grid (default: its centre); earlier, finer grids take the cell under its centre."""
    model.eval()
    names = {module: name for name, module in model.named_modules()}
    captured = _capture_inputs(model, VisformerAttention, lambda: model(_on_model(model, image)))
    if not captured:
        raise ValueError('the model has no attention stage to draw')
    last_h, last_w = captured[-1][1].shape[2:]
    row, col = at if at is not None else (last_h // 2, last_w // 2)
    if not (0 <= row < last_h and 0 <= col < last_w):
        raise ValueError(f'--at {row} {col} is outside the last attention stage\'s {last_h}x{last_w} grid')
    maps = []
    for module, x in captured:
        _, _, h, w = x.shape
        r, c = int((row + 0.5) * h / last_h), int((col + 0.5) * w / last_w)
        with torch.no_grad():
            q, k, _ = module.qkv(x).reshape(1, 3, module.num_heads, module.head_dim, h * w).unbind(1)
            query = q[0, :, :, r * w + c] * module.qk_scale  # (heads, head_dim)
            weights = torch.einsum('hd,hdn->hn', query, k[0] * module.qk_scale).softmax(-1)
        maps.append((names[module].rsplit('.attn', 1)[0], weights.reshape(-1, h, w).cpu(), (r, c)))
    return maps


def cam_layer(model):
    """The layer Grad-CAM weighs: the last transformer block of a VOLO (its (B, N, C) tokens, laid
    back on their grid) or the last block of a Visformer (a (B, C, H, W) map)."""
    if isinstance(model, VOLO):
        blocks = [m for m in model.network.modules() if isinstance(m, Transformer)]
        if not blocks:
            raise ValueError('the model has no transformer stage for a class activation map')
        return blocks[-1]
    if isinstance(model, Visformer):
        return getattr(model, f'stage{model.stage_ids[-1]}')[-1]
    raise ValueError(f'no class activation map for a {type(model).__name__}')


def class_activation_map(model, image: torch.Tensor, class_index=None):
    """Grad-CAM (pytorch-grad-cam's GradCAM) of `class_index` (default: the top class) for one
    normalised image: an (H, W) map in [0, 1] at the image's size, and the class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    layer = cam_layer(model)
    model.eval()
    with torch.no_grad():
        logits = model(_on_model(model, image))[0]
    if class_index is None:
        class_index = int(logits.argmax())
    elif not 0 <= class_index < logits.numel():
        raise ValueError(f'class {class_index} is outside the model\'s {logits.numel()} classes')
    rows, cols = image.shape[-2] // TOKEN_STRIDE, image.shape[-1] // TOKEN_STRIDE

    def tokens_to_map(tokens):  # VOLO's (B, N, C) tokens back on their (rows, cols) grid as (B, C, rows, cols)
        return tokens.reshape(tokens.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
    reshape = tokens_to_map if isinstance(model, VOLO) else None
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        heat = cam(input_tensor=_on_model(model, image), targets=[ClassifierOutputTarget(class_index)])[0]
    return torch.from_numpy(heat), class_index


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
    save_figure(fig, path, dpi=100, bbox_inches='tight')


def _figure(rows, cols, figsize, squeeze=True):
    """(figure, axes) drawn off-screen: matplotlib's Figure directly, so that drawing changes no
    pyplot state or backend of the caller (a notebook keeps its own)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _unnormalise(image, mean, std):
    pixels = image.permute(1, 2, 0).numpy() * np.asarray(std) + np.asarray(mean)
    return np.clip(pixels, 0, 1)


def draw_outlook(image, weights, pixels_per_cell, at, mean, std, path, block):
    """Each head's weights of the centre cell of the window at pooled cell `at`: over the image at
    the window's cells (the window outlined), and below as the k x k table of numbers."""
    rows, cols, heads, kk, _ = weights.shape
    k = int(round(kk ** 0.5))
    r, c = at
    centre = weights[r, c, :, kk // 2].reshape(heads, k, k)
    stride = pixels_per_cell * (image.shape[-1] // pixels_per_cell // cols)
    fig, axes = _figure(2, heads, figsize=(2.4 * heads, 5.0), squeeze=False)
    pixels = _unnormalise(image, mean, std)
    top = (r * stride // pixels_per_cell - k // 2) * pixels_per_cell
    left = (c * stride // pixels_per_cell - k // 2) * pixels_per_cell
    for h in range(heads):
        ax = axes[0, h]
        ax.imshow(pixels)
        overlay = np.zeros(pixels.shape[:2])
        for i in range(k):
            for j in range(k):
                y, x = top + i * pixels_per_cell, left + j * pixels_per_cell
                if 0 <= y < pixels.shape[0] and 0 <= x < pixels.shape[1]:
                    overlay[y:y + pixels_per_cell, x:x + pixels_per_cell] = float(centre[h, i, j])
        ax.imshow(np.ma.masked_equal(overlay, 0), cmap='magma', alpha=0.7, vmin=0, vmax=float(centre[h].max()))
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), k * pixels_per_cell, k * pixels_per_cell, fill=False,
                               edgecolor='white', linewidth=1))
        ax.set_title(f'head {h}', fontsize=8)
        ax.axis('off')
        table = axes[1, h]
        table.imshow(centre[h].numpy(), cmap='magma', vmin=0, vmax=float(centre[h].max()))
        for i in range(k):
            for j in range(k):
                value = float(centre[h, i, j])
                table.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=7,
                           color='black' if value > 0.6 * float(centre[h].max()) else 'white')
        table.set_xticks([])
        table.set_yticks([])
        table.set_title('its weights (sum 1)', fontsize=7)
    fig.suptitle(f'Outlook attention, block {block}, window at cell {tuple(at)}: what its centre gathers', fontsize=9)
    save_figure(fig, path, dpi=100, bbox_inches='tight')


def draw_class_attention(image, maps, grid, mean, std, path):
    fig, axes = _figure(1, len(maps), figsize=(3.4 * len(maps), 3.2), squeeze=False)
    pixels = _unnormalise(image, mean, std)
    for b, attention in enumerate(maps):
        heat = attention[:, 1:].mean(0).reshape(grid)
        heat = F.interpolate(heat[None, None], size=pixels.shape[:2], mode='nearest')[0, 0].numpy()
        axes[0, b].imshow(pixels)
        shown = axes[0, b].imshow(heat, cmap='jet', alpha=0.5)
        fig.colorbar(shown, ax=axes[0, b], fraction=0.046)
        axes[0, b].set_title(f'class-attention block {b} (mean of heads)', fontsize=8)
        axes[0, b].axis('off')
    fig.suptitle('Where the class token looks', fontsize=9)
    save_figure(fig, path, dpi=100, bbox_inches='tight')


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
    save_figure(fig, path, dpi=100, bbox_inches='tight')


def draw_visformer_attention(image, maps, mean, std, path):
    """Each attention block's weights of its query cell (mean of the heads) over the image, the
    query marked."""
    cols = min(4, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = _figure(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    pixels = _unnormalise(image, mean, std)
    for ax in axes.flat:
        ax.axis('off')
    for ax, (name, weights, (r, c)) in zip(axes.flat, maps):
        h, w = weights.shape[1:]
        heat = F.interpolate(weights.mean(0)[None, None], size=pixels.shape[:2], mode='nearest')[0, 0].numpy()
        ax.imshow(pixels)
        shown = ax.imshow(heat, cmap='jet', alpha=0.5)
        fig.colorbar(shown, ax=ax, fraction=0.046)
        cell_h, cell_w = pixels.shape[0] / h, pixels.shape[1] / w
        ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor='white', linewidth=1.5))
        ax.set_title(f'{name} ({h}x{w} grid)', fontsize=8)
    fig.suptitle('Visformer attention: where the outlined cell looks (mean of heads)', fontsize=9)
    save_figure(fig, path, dpi=100, bbox_inches='tight')


def draw_class_activation(image, heat, class_name, probability, mean, std, path):
    fig, axes = _figure(1, 2, figsize=(6.4, 3.4))
    pixels = _unnormalise(image, mean, std)
    axes[0].imshow(pixels)
    axes[0].set_title('image', fontsize=8)
    axes[1].imshow(pixels)
    shown = axes[1].imshow(heat.numpy(), cmap='jet', alpha=0.5, vmin=0, vmax=1)
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[1].set_title(f'Grad-CAM of {class_name} (p = {probability:.2f})', fontsize=8)
    for ax in axes:
        ax.axis('off')
    fig.suptitle('Class activation map: the regions that raise this class', fontsize=9)
    save_figure(fig, path, dpi=100, bbox_inches='tight')


def render(model, image, mean, std, names, out, block=(0, 0), at=None, cam_class=None):
    """Every picture of `model` (a VOLO or a Visformer) for one normalised image, as PNGs in folder
    `out`; returns their paths. A block, cell or class the model does not have is a ValueError."""
    written = []
    os.makedirs(out, exist_ok=True)

    def picture(name):
        written.append(os.path.join(out, name))
        return written[-1]
    if isinstance(model, VOLO):
        weights, pixels_per_cell = outlook_window_weights(model, image, block)
        at = at or (weights.shape[0] // 2, weights.shape[1] // 2)
        if not (0 <= at[0] < weights.shape[0] and 0 <= at[1] < weights.shape[1]):
            raise ValueError(f'--at {at[0]} {at[1]} is outside block {block}\'s {weights.shape[0]}x{weights.shape[1]} '
                             f'pooled grid')
        draw_outlook(image, weights, pixels_per_cell, at, mean, std, picture('outlook_attention.png'), block)
        maps, grid = class_attention(model, image)
        draw_class_attention(image, maps, grid, mean, std, picture('class_attention.png'))
        dense, overall = dense_prediction(model, image)
        draw_dense(image, dense, overall, names, mean, std, picture('dense_prediction.png'))
    else:
        draw_visformer_attention(image, visformer_attention(model, image, at), mean, std,
                                 picture('visformer_attention.png'))
    heat, cam_class = class_activation_map(model, image, cam_class)
    with torch.no_grad():
        probability = float(model(_on_model(model, image)).softmax(-1)[0, cam_class])
    draw_class_activation(image, heat, names[cam_class] if names else cam_class, probability, mean, std,
                          picture('class_activation.png'))
    return written


def parse_args(argv=None):
    from inference.classifier import add_model_options
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('image')
    p.add_argument('--checkpoint', default='')
    add_model_options(p)
    p.add_argument('--out', required=True, metavar='DIR')
    p.add_argument('--block', type=int, nargs=2, default=(0, 0), metavar=('STAGE', 'INDEX'),
                   help='VOLO: the outlooker block (stage 0: the outlookers)')
    p.add_argument('--at', type=int, nargs=2, default=None, metavar=('ROW', 'COL'),
                   help="VOLO: the window's cell on the block's pooled grid; Visformer: the query cell on the "
                        "last attention stage's grid (default: the centre)")
    p.add_argument('--cam-class', type=int, default=None, metavar='INDEX',
                   help='the class of the activation map (default: the top class)')
    p.add_argument('--token-labels', default='', metavar='FILE',
                   help="also draw this token-label file (tlt's .pt) of the image")
    p.add_argument('--device', default='cpu')
    return p.parse_args(argv)


def main(argv=None):
    from data import eval_transform
    from data.images import read_image
    from engine import check_writable_folder, select_device
    from inference.classifier import build_classifier, class_names
    from utils import read_checkpoint
    from utils.cli import UsageError
    from utils.log import setup_logging
    setup_logging()
    args = parse_args(argv)
    check_writable_folder(args.out, '--out')
    device = select_device(args.device)
    contents = read_checkpoint(args.checkpoint, use_ema=args.use_ema) if args.checkpoint else None
    model, config, settings = build_classifier(args, args.checkpoint, contents, device)
    if not isinstance(model, (VOLO, Visformer)):
        raise UsageError(f'{settings["model"]} is a {type(model).__name__}: tools.visualize draws VOLO and Visformer '
                         f'models')
    names = class_names(contents, model.num_classes)
    size = config['input_size'][-1]
    pixels = eval_transform(size, config['crop_pct'], config['interpolation'])(read_image(args.image, longest=size))
    mean, std = config['mean'], config['std']
    image = (pixels.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    try:
        written = render(model, image, mean, std, names, args.out, tuple(args.block), args.at, args.cam_class)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.token_labels:
        classes, scores = token_label_map(args.token_labels, model.num_classes)
        written.append(os.path.join(args.out, 'token_labels.png'))
        draw_token_labels(args.image, classes, scores, names, written[-1])
    for path in written:
        _logger.info('wrote %s', path)
    return written


def cli(argv=None):
    from data import DataError
    from engine import DiskFullError
    from utils import CheckpointError
    from utils.cli import UsageError, run_cli
    run_cli(main, argv, (UsageError, DataError, CheckpointError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
