"""mmseg's segmentation metrics: accumulated over the whole set, then divided.

Per class c (pixels labelled ignore excluded): intersect = |pred = c and label = c|,
union = |pred = c| + |label = c| - intersect. IoU_c = intersect / union, averaged over classes whose
union is non-zero (mIoU); Acc_c = intersect / |label = c|, averaged over classes present in the
labels (mAcc); aAcc = sum(intersect) / sum(|label = c|). Reported in percent.
"""
import math
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from layers import IGNORE_INDEX


class SegmentationMetric:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Optional[Sequence[str]] = None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self):
        self.intersect = torch.zeros(self.num_classes, dtype=torch.float64)
        self.pred_area = torch.zeros(self.num_classes, dtype=torch.float64)
        self.label_area = torch.zeros(self.num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor):
        """Add one prediction (H, W) of class indices against its label (H, W) (any size, same
        for both)."""
        if pred.shape != label.shape:
            raise ValueError(f'prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size')
        pred, label = pred.reshape(-1).long().cpu(), label.reshape(-1).long().cpu()
        valid = label != self.ignore_index
        pred, label = pred[valid], label[valid]
        k = self.num_classes
        self.intersect += torch.bincount(label[pred == label], minlength=k)[:k].double()
        self.pred_area += torch.bincount(pred, minlength=k)[:k].double()
        self.label_area += torch.bincount(label, minlength=k)[:k].double()

    def all_reduce(self):
        """Sum the counts of every process (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            backend_device = 'cuda' if dist.get_backend() == 'nccl' else 'cpu'
            counts = torch.stack([self.intersect, self.pred_area, self.label_area]).to(backend_device)
            dist.all_reduce(counts)
            self.intersect, self.pred_area, self.label_area = counts.cpu().unbind(0)

    def compute(self) -> Dict:
        union = self.pred_area + self.label_area - self.intersect
        iou = torch.where(union > 0, self.intersect / union.clamp(min=1), torch.full_like(union, math.nan))
        acc = torch.where(self.label_area > 0, self.intersect / self.label_area.clamp(min=1),
                          torch.full_like(union, math.nan))
        total = float(self.label_area.sum())

        def mean(values):
            present = values[~values.isnan()]
            return float(present.mean()) * 100 if present.numel() else math.nan

        return {
            'mIoU': mean(iou), 'mAcc': mean(acc),
            'aAcc': float(self.intersect.sum()) / total * 100 if total else math.nan,
            'per_class': [{'class': name, 'IoU': float(i) * 100, 'Acc': float(a) * 100}
                          for name, i, a in zip(self.class_names, iou, acc)],
        }


def format_table(results: Dict) -> str:
    """The per-class IoU/Acc table and the summary line, as text."""
    width = max([5] + [len(row['class']) for row in results['per_class']])
    lines = [f'{"Class":<{width}}  {"IoU":>6}  {"Acc":>6}']
    for row in results['per_class']:
        lines.append(f'{row["class"]:<{width}}  {row["IoU"]:>6.2f}  {row["Acc"]:>6.2f}')
    lines.append(f'mIoU {results["mIoU"]:.2f}  mAcc {results["mAcc"]:.2f}  aAcc {results["aAcc"]:.2f}')
    return '\n'.join(lines)
