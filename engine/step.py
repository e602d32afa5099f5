"""The optimizer step, the loss check and the out-of-memory message every trainer shares."""
import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad

from utils.cli import NonFiniteLoss, UsageError

OUT_OF_MEMORY = ('out of memory', "can't allocate memory", 'not enough memory')


def check_finite_loss(loss, runtime, where):
    """Stop every rank together when the loss of any rank is NaN or Inf: the losses are gathered
    (one collective a step), so each rank raises NonFiniteLoss naming `where` (e.g. 'epoch 3,
    step 10') and the ranks whose loss was not finite, instead of one rank stopping and the others
    failing inside the next collective."""
    value = loss.detach().float().reshape(1)
    if runtime.distributed:
        values = [torch.empty_like(value) for _ in range(runtime.world_size)]
        dist.all_gather(values, value)
        values = torch.cat(values).tolist()
    else:
        values = value.tolist()
    bad = [(rank, v) for rank, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        ranks = ', '.join(f'rank {rank} ({v})' for rank, v in bad) if runtime.distributed else f'({bad[0][1]})'
        raise NonFiniteLoss(f'non-finite loss {ranks} at {where}: stopping. The checkpoints written before are kept '
                            f'(lower --lr, or leave --amp off)')


def optimizer_step(loss, optimizer, parameters, amp, clip_grad=None, clip_mode='norm'):
    """zero_grad, backward (through the loss scaler or apex when mixed precision has one),
    gradient clipping (`clip_mode`: norm, value or agc) and the step."""
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
