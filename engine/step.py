"""The training step every trainer takes, written once (in the manner of detectron2's
SimpleTrainer.run_step): autocast -> the trainer's forward and loss -> one host read of the loss,
agreed over the ranks -> backward through the loss scaler -> gradient clipping -> optimizer step
-> EMA update -> the learning-rate schedule's per-update step. A trainer supplies only its forward
and loss (and its data, metric and schedule); the out-of-memory message names its options."""
import logging
import math
from contextlib import contextmanager
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad

from utils.cli import NonFiniteLoss, UsageError

_logger = logging.getLogger(__name__)

OUT_OF_MEMORY = ('out of memory', "can't allocate memory", 'not enough memory')


def agreed_loss(loss, runtime, where) -> float:
    """The loss as a Python number: the step's one read back to the host. When the loss of any rank
    is NaN or Inf, every rank raises NonFiniteLoss naming `where` (e.g. 'epoch 3, step 10') and the
    ranks whose loss was not finite, instead of one rank stopping and the others failing inside the
    next collective. Over several processes the agreement costs one all-reduce of one number (the
    sum of the losses, non-finite when any is) read together with the loss; only a run that stops
    gathers the losses, to name the ranks."""
    value = loss.detach().to(torch.float64).reshape(1)
    if not runtime.distributed:
        local = value.item()
        if not math.isfinite(local):
            raise NonFiniteLoss(_non_finite_message(f'({local})', where))
        return local
    total = value.clone()
    dist.all_reduce(total)
    local, summed = torch.cat([value, total]).tolist()
    if math.isfinite(summed):
        return local
    values = [torch.empty_like(value) for _ in range(runtime.world_size)]
    dist.all_gather(values, value)
    bad = [(rank, v) for rank, v in enumerate(torch.cat(values).tolist()) if not math.isfinite(v)]
    raise NonFiniteLoss(_non_finite_message(', '.join(f'rank {rank} ({v})' for rank, v in bad), where))


def _non_finite_message(ranks, where):
    return (f'non-finite loss {ranks} at {where}: stopping. The checkpoints written before are kept (lower --lr, '
            f'or leave --amp off)')


def optimizer_step(loss, optimizer, parameters, amp, clip_grad=None, clip_mode='norm'):
    """zero_grad, backward (through the loss scaler or apex when mixed precision has one),
    gradient clipping (`clip_mode`: norm, value or agc) and the step. With the float16 loss scaler
    a step whose gradients overflowed is skipped and the scale lowered (torch.amp.GradScaler)."""
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    if amp.loss_scaler is not None:
        amp.loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=parameters)
        return
    if amp.kind == 'apex':
        from apex import amp as apex_amp
        with apex_amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
    else:
        loss.backward()
    if clip_grad is not None:
        dispatch_clip_grad(parameters, value=clip_grad, mode=clip_mode)
    optimizer.step()


def current_lr(optimizer) -> float:
    """The mean learning rate of the optimizer's parameter groups."""
    groups = optimizer.param_groups
    return sum(group['lr'] for group in groups) / len(groups)


class UpdateSchedule:
    """A learning rate given per optimizer update by `lr_at(update)` (segmentation's poly,
    detection's steps), stepped the way timm's schedulers are: step_update(n) after the n-th
    update sets the rate of the next one, step(epoch) does nothing. Each parameter group gets the
    rate times its 'lr_mult' (1 when it has none); `lr` is the rate (before the multipliers) of the
    coming update."""

    def __init__(self, optimizer, lr_at: Callable[[int], float], start: int = 0):
        self.optimizer, self.lr_at = optimizer, lr_at
        self.lr = None
        self.step_update(start)

    def step(self, epoch, metric=None):
        pass

    def step_update(self, num_updates, metric=None):
        self.lr = self.lr_at(num_updates)
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr * group.get('lr_mult', 1.0)


class StepResult(NamedTuple):
    loss: float             # the loss of this step (this rank's), read once
    parts: Optional[dict]   # what the forward returned beside the loss (e.g. the loss terms), as tensors
    lr: float               # the mean learning rate this step was taken with

    def part_values(self) -> dict:
        """The loss terms in `parts` as Python numbers, read back together (for a log line)."""
        if not self.parts:
            return {}
        values = torch.stack([v.detach().float().reshape(()) for v in self.parts.values()]).tolist()
        return dict(zip(self.parts, values))


class TrainingStep:
    """One optimizer step of a trainer, from its forward to its schedule.

    `model`: the module being trained (wrapped in DDP when it is), the source of the EMA;
    `schedule`: a timm scheduler or UpdateSchedule, stepped per update (its per-epoch step stays
    with the trainer); `clip_grad`/`clip_mode`: timm's dispatch_clip_grad (norm, value, agc), on
    unscaled gradients under the loss scaler; `model_ema`: timm's ModelEmaV2 (or V3), updated after
    every step; `memory_hint`: the options an out-of-memory error names; `updates`: updates already
    done (a resumed run), the count the schedule is stepped with."""

    def __init__(self, model, optimizer, runtime, schedule=None, clip_grad=None, clip_mode='norm', model_ema=None,
                 memory_hint='the batch size', updates=0):
        self.model, self.optimizer, self.runtime = model, optimizer, runtime
        self.schedule, self.clip_grad, self.clip_mode = schedule, clip_grad, clip_mode
        self.model_ema, self.memory_hint, self.updates = model_ema, memory_hint, updates
        self.parameters = [p for group in optimizer.param_groups for p in group['params']]

    def __call__(self, forward: Callable, where: str) -> StepResult:
        """forward(): the trainer's forward pass and loss, run under autocast; returns the loss, or
        (loss, parts). `where` names the step in messages ('epoch 2, step 7')."""
        lr = current_lr(self.optimizer)
        with explain_out_of_memory(where, self.memory_hint):
            with self.runtime.amp.autocast():
                output = forward()
            loss, parts = output if isinstance(output, tuple) else (output, None)
            value = agreed_loss(loss, self.runtime, where)
            optimizer_step(loss, self.optimizer, self.parameters, self.runtime.amp, self.clip_grad, self.clip_mode)
        if self.model_ema is not None:
            self.model_ema.update(self.model)
        self.updates += 1
        if self.schedule is not None:
            self.schedule.step_update(num_updates=self.updates)
        return StepResult(value, parts, lr)


def enable_grad_checkpointing(model, name):
    """--grad-checkpointing: every part of `model` that can recompute its blocks in backward (timm's
    set_grad_checkpointing: the backbone of a segmentor or detector, the whole of a classifier)
    does so; a model with none is a UsageError naming `name`."""
    parts = [m for m in model.modules() if callable(getattr(m, 'set_grad_checkpointing', None))]
    if not parts:
        raise UsageError(f'--grad-checkpointing: {name} has no gradient checkpointing')
    for part in parts:
        part.set_grad_checkpointing(True)


def is_out_of_memory(error):
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in OUT_OF_MEMORY))


@contextmanager
def explain_out_of_memory(where, options):
    """An out-of-memory error inside (a training step at `where`) becomes one line naming the
    `options` to lower, instead of an allocator traceback."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f'out of memory at {where} ({first_line}): lower {options}') from None
