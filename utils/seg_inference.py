"""Whole-image, sliding-window and multi-scale + flip inference of a segmentor (mmseg's
definitions). A segmentor here is any module whose eval-mode forward returns logits at its input's
size for inputs whose sides are multiples of its `size_divisor`."""
import math
from contextlib import nullcontext
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

AUG_TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def default_stride(crop_size):
    """The sliding-window stride of mmseg's recipes: 2/3 of the crop, rounded up (341 for 512)."""
    return tuple(max(1, math.ceil(c * 2 / 3)) for c in crop_size)


def check_window(crop_size, stride, size_divisor=16):
    """A clear error for crop sizes that are not multiples of size_divisor and strides that are
    not in 1..crop."""
    for name, value in (('crop size', crop_size), ('stride', stride)):
        if len(value) != 2 or any(not isinstance(v, int) for v in value):
            raise ValueError(f'{name} must be two integers (height width), got {value!r}')
    if any(c <= 0 or c % size_divisor for c in crop_size):
        raise ValueError(f'crop size {crop_size[0]}x{crop_size[1]}: both sides must be positive multiples of '
                         f'{size_divisor}')
    if any(s <= 0 or s > c for s, c in zip(stride, crop_size)):
        raise ValueError(f'stride {stride[0]}x{stride[1]} must be between 1 and the crop size '
                         f'{crop_size[0]}x{crop_size[1]} (windows would leave pixels out)')


def slide_windows(height: int, width: int, crop_size, stride) -> List[Tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window: max(H - ch + sh - 1, 0) // sh + 1 rows (columns likewise),
    the last one shifted back inside the image."""
    (ch, cw), (sh, sw) = crop_size, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def _pad_to(x, height, width):
    return F.pad(x, (0, width - x.shape[3], 0, height - x.shape[2]))


def whole_inference(model, image):
    """Logits (B, K, H, W) of the whole image, padded at the bottom and right to the model's
    size divisor."""
    divisor = getattr(model, 'size_divisor', 1)
    h, w = image.shape[2:]
    padded = _pad_to(image, math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor)
    return model(padded)[:, :, :h, :w]


def slide_inference(model, image, num_classes, crop_size, stride, batch_size=4):
    """Logits (B, K, H, W): windows (padded when the image is smaller than the crop) run in batches
    of `batch_size`, overlapping logits summed and divided by the number of windows per pixel."""
    b, _, h, w = image.shape
    ch, cw = crop_size
    logits = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    windows = slide_windows(h, w, crop_size, stride)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        crops = torch.cat([_pad_to(image[:, :, y1:y2, x1:x2], ch, cw) for y1, y2, x1, x2 in chunk])
        out = model(crops).float()
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[k * b:(k + 1) * b, :, :y2 - y1, :x2 - x1]
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def infer(model, image, num_classes, mode='whole', crop_size=None, stride=None, batch_size=4):
    if mode == 'slide':
        return slide_inference(model, image, num_classes, crop_size, stride, batch_size)
    if mode == 'whole':
        return whole_inference(model, image)
    raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")


def predict_scores(model, image, out_size, num_classes, mode='whole', crop_size=None, stride=None,
                   ratios: Sequence[float] = (1.0,), flip=False, batch_size=4):
    """Per-pixel class scores (B, K, *out_size): logits of every scale ratio (and its horizontal flip,
    when asked) resized bilinearly to out_size, softmax, averaged. With one ratio and no flip this is
    the softmax of the single pass, so its argmax is the plain prediction."""
    h, w = image.shape[2:]
    total, passes = None, 0
    for ratio in ratios:
        scaled = image if ratio == 1.0 else F.interpolate(
            image, size=(max(int(h * ratio + 0.5), 1), max(int(w * ratio + 0.5), 1)), mode='bilinear',
            align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            x = scaled.flip(3) if flipped else scaled
            logits = infer(model, x, num_classes, mode, crop_size, stride, batch_size)
            if flipped:
                logits = logits.flip(3)
            scores = F.interpolate(logits, size=tuple(out_size), mode='bilinear', align_corners=False).softmax(1)
            total = scores if total is None else total + scores
            passes += 1
    return total / passes


def evaluate_segmentation(model, dataset, device, metric, mode='whole', crop_size=None, stride=None,
                          ratios=(1.0,), flip=False, autocast=None, workers=2, indices=None, on_prediction=None,
                          progress=True, window_batch=4):
    """Run the model over `dataset` (items: normalised image, label at the original size, index),
    one image at a time, and add every prediction (argmax of predict_scores at the label's size)
    to `metric`. indices: this process's share (default: all). on_prediction(index, pred): called
    with each (H, W) uint8 prediction, e.g. to save it. Returns the metric (not yet all-reduced)."""
    subset = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=1, shuffle=False, num_workers=workers,
                        pin_memory=device.type == 'cuda', persistent_workers=False)
    was_training = model.training
    model.eval()
    autocast = autocast or nullcontext
    try:
        with torch.inference_mode():
            for image, label, index in tqdm(loader, desc='eval', disable=None if progress else True, leave=False):
                image = image.to(device, non_blocking=True)
                with autocast():
                    scores = predict_scores(model, image, label.shape[1:], metric.num_classes, mode, crop_size,
                                            stride, ratios, flip, window_batch)
                pred = scores.argmax(1)[0].to(torch.uint8).cpu()
                metric.update(pred, label[0])
                if on_prediction is not None:
                    on_prediction(int(index[0]), pred)
    finally:
        model.train(was_training)
    return metric
