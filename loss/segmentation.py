"""The segmentation objective of mmseg's UperNet recipe."""
import torch.nn as nn
import torch.nn.functional as F

from layers import IGNORE_INDEX


def pixel_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    """Cross entropy of logits (B, K, h, w) resized bilinearly (align_corners False) to the labels'
    (B, H, W) size, averaged over all pixels of the batch with ignored ones counted as zeros (mmseg's
    default, avg_non_ignore=False)."""
    if logits.shape[2:] != labels.shape[1:]:
        logits = F.interpolate(logits, size=labels.shape[1:], mode='bilinear', align_corners=False)
    losses = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction='none')
    return losses.mean()


class SegmentationLoss(nn.Module):
    """decode weight x CE(decode logits) + aux weight x CE(auxiliary logits); returns
    (total, {'decode': ..., 'aux': ...})."""

    def __init__(self, decode_weight=1.0, aux_weight=0.4, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.decode_weight, self.aux_weight, self.ignore_index = decode_weight, aux_weight, ignore_index

    def forward(self, outputs, labels):
        decode_logits, aux_logits = outputs
        parts = {'decode': pixel_cross_entropy(decode_logits, labels, self.ignore_index)}
        total = self.decode_weight * parts['decode']
        if aux_logits is not None and self.aux_weight:
            parts['aux'] = pixel_cross_entropy(aux_logits, labels, self.ignore_index)
            total = total + self.aux_weight * parts['aux']
        return total, {k: v.detach() for k, v in parts.items()}
