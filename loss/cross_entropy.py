"""Token-labeling objectives (the reference's names and formulas).

Targets are either (B, K) soft labels of the whole image, copied to every token, or (B, K, 2 + N)
from data.create_token_label_target: slot 0 the smoothed one-hot ground truth, slot 1 the class
token's label, slots 2.. the N token labels in row-major order.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SoftTargetCrossEntropy(nn.Module):
    """Mean over rows of sum_k -t_k log_softmax(x)_k."""

    def forward(self, x, target):
        if x.shape != target.shape:
            raise ValueError(f'logits {tuple(x.shape)} and soft targets {tuple(target.shape)} differ in shape')
        return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


def _split_targets(target, num_tokens, num_classes):
    """(class-token target, token targets (B*N, K), ground truth or None) of a (B,K) or (B,K,2+N) target."""
    if target.shape[1] != num_classes:
        raise ValueError(f'targets have {target.shape[1]} classes, the model predicts {num_classes}')
    if target.ndim == 2:
        return target, target.repeat_interleave(num_tokens, dim=0), None
    if target.ndim != 3:
        raise ValueError(f'targets must be (B, K) or (B, K, 2+N), got {tuple(target.shape)}')
    token_slots = target.shape[2] - 2
    if token_slots != num_tokens:
        grid, side = int(round(token_slots ** 0.5)), int(round(num_tokens ** 0.5))
        raise ValueError(
            f'token labels have {token_slots} tokens ({grid}x{grid}) but the model predicts {num_tokens} '
            f'({side}x{side}): use --token-label-size {side} for this model and image size')
    token_targets = target[:, :, 2:].transpose(1, 2).reshape(-1, num_classes)
    return target[:, :, 1], token_targets, target[:, :, 0]


def _box_lam(box, num_tokens):
    """Share of tokens outside the MixToken box (1 when there is no box)."""
    r1, c1, r2, c2 = (int(b) for b in box)
    return 1. - (r2 - r1) * (c2 - c1) / num_tokens


def _mix_by_box(target_cls, box, num_tokens):
    lam = _box_lam(box, num_tokens)
    if lam < 1:
        target_cls = lam * target_cls + (1. - lam) * target_cls.flip(0)
    return target_cls


class TokenLabelCrossEntropy(nn.Module):
    """cls_weight * SCE(class logits, class target mixed by the MixToken box)
    + dense_weight * SCE(every token's logits, its token label).

    `mixup_active` and `classes` are the reference's arguments; `classes` (when given) is checked
    against the targets."""

    def __init__(self, dense_weight=1.0, cls_weight=1.0, mixup_active=True, classes=None):
        super().__init__()
        self.dense_weight = dense_weight
        self.cls_weight = cls_weight
        self.mixup_active = mixup_active
        self.classes = classes
        self.soft_ce = SoftTargetCrossEntropy()

    def _targets(self, output, target):
        if not (isinstance(output, (tuple, list)) and len(output) == 3):
            raise ValueError(f'{type(self).__name__} takes the model\'s training output '
                             '(cls_logits, aux_logits, box); this model gives no dense predictions')
        cls_logits, aux_logits, box = output
        B, N, K = aux_logits.shape
        if self.classes is not None and K != self.classes:
            raise ValueError(f'the loss was built for {self.classes} classes, the model predicts {K}')
        target_cls, target_tokens, ground_truth = _split_targets(target, N, K)
        return cls_logits, aux_logits.reshape(-1, K), box, N, target_cls, target_tokens, ground_truth

    def _combine(self, cls_logits, aux_logits, target_cls, target_tokens):
        return (self.cls_weight * self.soft_ce(cls_logits, target_cls)
                + self.dense_weight * self.soft_ce(aux_logits, target_tokens))

    def forward(self, output, target):
        cls_logits, aux, box, N, target_cls, target_tokens, _ = self._targets(output, target)
        return self._combine(cls_logits, aux, _mix_by_box(target_cls, box, N), target_tokens)


class TokenLabelGTCrossEntropy(TokenLabelCrossEntropy):
    """TokenLabelCrossEntropy whose class target is first blended with the ground truth:
    ratio 0.5 where the two agree on the top class, 0.9 where they disagree."""

    def forward(self, output, target):
        cls_logits, aux, box, N, target_cls, target_tokens, ground_truth = self._targets(output, target)
        if ground_truth is not None:
            agree = ground_truth.argmax(-1) == target_cls.argmax(-1)
            ratio = (0.9 - 0.4 * agree.to(target_cls.dtype)).unsqueeze(-1)
            target_cls = ratio * target_cls + (1. - ratio) * ground_truth
        return self._combine(cls_logits, aux, _mix_by_box(target_cls, box, N), target_tokens)


class TokenLabelSoftTargetCrossEntropy(nn.Module):
    """Soft-target cross entropy on the class logits alone, for image-level (label size 1) training:
    takes plain logits or the training tuple, and (B, K) or (B, K, 2+N) targets (slot 1 is used)."""

    def __init__(self):
        super().__init__()
        self.soft_ce = SoftTargetCrossEntropy()

    def forward(self, output, target):
        box = None
        if isinstance(output, (tuple, list)):
            output, aux, box = output
        if target.ndim == 3:
            target = target[:, :, 1]
        if box is not None:
            target = _mix_by_box(target, box, aux.shape[1])
        return self.soft_ce(output, target)
