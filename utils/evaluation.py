"""Top-1 / top-5 / loss evaluation shared by main.py and validate.py, reduced across ranks."""
import logging
import time
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

_logger = logging.getLogger(__name__)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def evaluate(model, loader, autocast=nullcontext, channels_last=False, log_interval=50, log_suffix='',
             progress=None):
    """OrderedDict(loss, top1, top5) in percent over the whole loader (all ranks), plus the number
    of images scored (unreadable ones are not) and images/s."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    start = time.perf_counter()
    batches = progress(loader) if progress is not None else loader
    with torch.no_grad():
        for batch_idx, (images, target) in enumerate(batches):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                output = model(images)
            if isinstance(output, (tuple, list)):
                output = output[0]
            output = output.float()
            top5 = output.topk(min(5, output.shape[1]), dim=1).indices
            hits = top5 == target[:, None]
            totals += torch.stack([F.cross_entropy(output, target, reduction='sum').double(),
                                   hits[:, 0].sum().double(), hits.any(1).sum().double(),
                                   torch.tensor(float(target.numel()), dtype=torch.float64, device=device)])
            if log_interval and batch_idx % log_interval == 0 and progress is None:
                _logger.info('Test%s: [%d/%d]', log_suffix, batch_idx, len(loader))
    elapsed = time.perf_counter() - start
    if is_distributed():
        dist.all_reduce(totals)
    loss_sum, top1, top5, count = totals.tolist()
    if count == 0:
        raise RuntimeError('the evaluation loader yielded no images')
    metrics = OrderedDict(loss=loss_sum / count, top1=100. * top1 / count, top5=100. * top5 / count)
    _logger.info('Test%s: loss %.4f  top1 %.3f  top5 %.3f  (%d images, %.1f img/s)', log_suffix,
                 metrics['loss'], metrics['top1'], metrics['top5'], int(count), count / elapsed)
    metrics['num_images'] = int(count)
    metrics['images_per_s'] = count / elapsed
    return metrics
