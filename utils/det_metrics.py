"""COCO's detection metrics through pycocotools: detector outputs to COCO's results format, the
12 COCOeval statistics by name, and evaluation of a torchvision detector over a COCO dataset with
every image counted once across processes."""
import contextlib
import io
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

__all__ = ['COCO_STAT_NAMES', 'detections_to_coco', 'coco_stats', 'evaluate_detection']

# COCOeval.summarize's order
COCO_STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def binary_mask(masks, i, threshold=0.5):
    """Detection i's mask as a boolean (height, width) tensor on the CPU, from a detector's
    (N, 1, H, W) probabilities or from masks given one at a time as booleans (PastedMasks)."""
    mask = masks[i]
    return mask if mask.dtype == torch.bool and mask.ndim == 2 else (mask.detach()[0] > threshold).cpu()


def detections_to_coco(outputs: List[Dict[str, torch.Tensor]], image_ids, label_to_category,
                       mask_threshold=0.5) -> List[dict]:
    """torchvision detector outputs (one dict per image, at the original image size; masks as
    binary_mask reads them) as COCO results: the dataset's image and category ids, xywh boxes, and
    RLE masks with string counts (what pycocotools' loadRes reads)."""
    results = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output['boxes'].detach().cpu().float()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output['scores'].detach().cpu().tolist()
        labels = output['labels'].detach().cpu().tolist()
        masks = output.get('masks')
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            result = {'image_id': int(image_id), 'category_id': int(label_to_category[label]),
                      'bbox': [round(v, 3) for v in box], 'score': round(float(score), 5)}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(binary_mask(masks, i, mask_threshold).numpy(), np.uint8))
                rle['counts'] = rle['counts'].decode('ascii')
                result['segmentation'] = rle
            results.append(result)
    return results


def coco_stats(coco_gt, results, kinds=('bbox', 'segm'), image_ids=None):
    """{kind: {name: value}} of COCOeval for each kind ('bbox', 'segm'), and pycocotools' printed
    summaries as one text. No results give zeros (COCOeval cannot load an empty list)."""
    stats, printed = {}, []
    for kind in kinds:
        if not results:
            stats[kind] = dict.fromkeys(COCO_STAT_NAMES, 0.0)
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            evaluation = COCOeval(coco_gt, coco_gt.loadRes(results), kind)
            if image_ids is not None:
                evaluation.params.imgIds = sorted(image_ids)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        printed.append(f'{kind}:\n' + buffer.getvalue().split('DONE (t=')[-1].split('\n', 1)[-1])
        stats[kind] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluation.stats)}
    return stats, '\n'.join(printed)


def evaluate_detection(model, loader, label_to_category, device, autocast=None, on_outputs=None):
    """COCO results of `model` (a torchvision detector) over `loader` (batches of (images, targets)
    with 'image_id'), gathered from every process and kept once per image (a distributed sampler
    repeats images to even out the shards). Returns (results, image ids). on_outputs(image_ids,
    outputs), when given, sees this process's outputs of each batch (e.g. to draw them)."""
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext
    results, seen = [], set()
    try:
        with torch.inference_mode():
            for images, targets in loader:
                ids = [int(t['image_id']) for t in targets]
                with autocast():
                    outputs = model([image.to(device) for image in images])
                if on_outputs is not None:
                    on_outputs(ids, outputs)
                new = [(o, i) for o, i in zip(outputs, ids) if i not in seen]
                seen.update(ids)
                results += detections_to_coco([o for o, _ in new], [i for _, i in new], label_to_category)
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, sorted(seen)))
        by_image, seen = {}, set()
        for part, ids in gathered:
            for r in part:
                by_image.setdefault(r['image_id'], {}).setdefault(id(part), []).append(r)
            seen.update(ids)
        results = [r for parts in by_image.values() for r in next(iter(parts.values()))]
    return results, sorted(seen)
