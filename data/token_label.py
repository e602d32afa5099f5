"""Dense token-label targets from tlt-format label maps, and token-label-aware mixup/cutmix.

Per-sample layout (tlt's): a (3, 5, H, W) tensor; [0] the top-5 dense logits, [1] their class
indices, [2, 0, 0, 0:4] the crop box (top, left, height, width) normalised by the image size and
[2, 0, 0, 5] the ground-truth class.
"""
import math

import numpy as np
import torch
from torchvision.ops import roi_align

BOX_SLOTS = slice(0, 4)
CLASS_SLOT = 5
MIN_MAP_WIDTH = CLASS_SLOT + 1


def pack_sample_target(label_map: torch.Tensor, box, class_index: int) -> torch.Tensor:
    """(2, 5, H, W) label map + crop box + class -> the (3, 5, H, W) per-sample layout."""
    _, _, H, W = label_map.shape
    if W < MIN_MAP_WIDTH:
        raise ValueError(f'label maps must be at least {MIN_MAP_WIDTH} wide to carry the crop box and '
                         f'class in the tlt layout, got {H}x{W}')
    extra = torch.zeros(1, 5, H, W, dtype=torch.float32)
    extra[0, 0, 0, BOX_SLOTS] = torch.as_tensor(box, dtype=torch.float32)
    extra[0, 0, 0, CLASS_SLOT] = float(class_index)
    return torch.cat([label_map.float(), extra], dim=0)


def smoothed_one_hot(labels, num_classes, smoothing=0.0, device=None):
    off = smoothing / num_classes
    on = 1. - smoothing + off
    labels = labels.long().view(-1, 1).to(device)
    return torch.full((labels.shape[0], num_classes), off, device=device).scatter_(1, labels, on)


def dense_label_maps(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scatter the top-5 logits of (B, 3|2, 5, H, W) layouts into dense (B, K, H, W) maps."""
    scores, indices = target[:, 0].float(), target[:, 1].long()
    if indices.numel() and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(f'label maps hold class indices up to {int(indices.max())}, '
                         f'but num_classes is {num_classes}')
    B, _, H, W = scores.shape
    dense = torch.zeros(B, num_classes, H, W, device=target.device)
    return dense.scatter_(1, indices, scores)


def crop_label_maps(dense: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """roi_align of (top, left, height, width) boxes, normalised, to (B, K, size, size).

    torchvision takes boxes as (x1, y1, x2, y2): columns first. Coordinates are scaled by the map
    size minus 0.5 with aligned=False, as the reference does."""
    B, _, H, W = dense.shape
    top, left, height, width = boxes.float().unbind(1)
    rois = torch.stack([
        torch.arange(B, device=dense.device, dtype=torch.float32),
        left * W - 0.5, top * H - 0.5, (left + width) * W - 0.5, (top + height) * H - 0.5], dim=1)
    return roi_align(dense, rois, output_size=(size, size), aligned=False)


def create_token_label_target(target, num_classes=1000, lam=1.0, smoothing=0.0, label_size=1, device=None):
    """Training targets from a batch of per-sample layouts.

    (B, 3, 5, H, W) layouts -> (B, K, 2 + label_size**2): slot 0 the smoothed one-hot ground truth,
    slot 1 the image-level label, slots 2.. the label_size x label_size token labels, row-major.
    Integer labels (B,) -> smoothed one-hot (B, K). `lam` < 1 mixes each sample with the
    batch-reversed one (mixup)."""
    device = device if device is not None else target.device
    target = target.to(device)
    if target.ndim == 1:
        y = smoothed_one_hot(target, num_classes, smoothing, device)
        return lam * y + (1. - lam) * y.flip(0) if lam < 1 else y
    if target.ndim != 5 or tuple(target.shape[1:3]) != (3, 5):
        raise ValueError(f'expected (B, 3, 5, H, W) token-label layouts, got {tuple(target.shape)}')
    dense = dense_label_maps(target, num_classes)
    boxes = target[:, 2, 0, 0, BOX_SLOTS]
    off = smoothing / num_classes
    on = 1. - smoothing + off
    tokens = crop_label_maps(dense, boxes, label_size).flatten(2).softmax(dim=1) * on + off
    image = crop_label_maps(dense, boxes, 1).flatten(2).softmax(dim=1) * on + off
    truth = smoothed_one_hot(target[:, 2, 0, 0, CLASS_SLOT].round(), num_classes, smoothing, device)
    y = torch.cat([truth.unsqueeze(2), image, tokens], dim=2)
    return lam * y + (1. - lam) * y.flip(0) if lam < 1 else y


def _cutmix_box(img_h, img_w, lam, rng):
    cut_rat = math.sqrt(1. - lam)
    cut_h, cut_w = int(img_h * cut_rat), int(img_w * cut_rat)
    cy, cx = rng.integers(img_h), rng.integers(img_w)
    y1, y2 = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
    x1, x2 = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
    return int(y1), int(x1), int(y2), int(x2)


class TokenLabelMixup:
    """Batch-mode mixup / cutmix of images together with their token-label targets.

    Mixup blends every target slot by lam. CutMix pastes a box of the batch-reversed images; the
    token labels inside the box (by token centre) come from the pasted image and the image-level
    slots are blended by the pasted area."""

    def __init__(self, mixup_alpha=1., cutmix_alpha=0., prob=1.0, switch_prob=0.5, mode='batch',
                 label_smoothing=0.1, num_classes=1000, label_size=1, seed=None):
        if mode != 'batch':
            raise ValueError(f"TokenLabelMixup supports mode='batch' only, got {mode!r}")
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError('TokenLabelMixup needs mixup_alpha > 0 or cutmix_alpha > 0')
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.label_size = label_size
        self.rng = np.random.default_rng(seed)

    def _draw(self):
        if self.rng.random() > self.prob:
            return 1., False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, x, target):
        if x.shape[0] % 2:
            raise ValueError(f'mixup/cutmix needs an even batch size, got {x.shape[0]}')
        lam, use_cutmix = self._draw()
        kwargs = dict(num_classes=self.num_classes, smoothing=self.label_smoothing,
                      label_size=self.label_size, device=x.device)
        if lam >= 1.:
            return x, create_token_label_target(target, **kwargs)
        if not use_cutmix:
            flipped = x.flip(0)  # a copy, taken before x is scaled in place
            x.mul_(lam).add_(flipped.mul_(1. - lam))
            return x, create_token_label_target(target, lam=lam, **kwargs)
        H, W = x.shape[-2:]
        y1, x1, y2, x2 = _cutmix_box(H, W, lam, self.rng)
        x[:, :, y1:y2, x1:x2] = x.flip(0)[:, :, y1:y2, x1:x2]
        area_lam = 1. - (y2 - y1) * (x2 - x1) / (H * W)
        y = create_token_label_target(target, **kwargs)
        mixed = area_lam * y + (1. - area_lam) * y.flip(0)
        if y.ndim == 3:
            S = self.label_size
            centres_y = (torch.arange(S, device=x.device) + 0.5) * H / S
            centres_x = (torch.arange(S, device=x.device) + 0.5) * W / S
            inside = (((centres_y >= y1) & (centres_y < y2))[:, None]
                      & ((centres_x >= x1) & (centres_x < x2))[None, :]).flatten()
            tokens = y[:, :, 2:]
            mixed[:, :, 2:] = torch.where(inside, tokens.flip(0), tokens)
        return x, mixed
