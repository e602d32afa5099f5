"""Device, process group and mixed precision, resolved once by the training scripts."""
import logging
import os
from functools import partial

import torch
import torch.distributed as dist
from timm.utils import NativeScaler

_logger = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


def init_distributed(device=None, local_rank=0):
    """(device, rank, world size): torchrun's env:// rendezvous when WORLD_SIZE > 1 (NCCL on GPUs,
    gloo on CPUs). `device`: None picks CUDA when present, else 'cuda' or 'cpu'."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', local_rank))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise DeviceError('--device cuda was asked for but no CUDA device is available')
    if use_cuda:
        device = torch.device(f'cuda:{local_rank}')
        torch.cuda.set_device(local_rank)
    else:
        device = torch.device('cpu')
    if world_size > 1:
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method='env://')
        world_size, rank = dist.get_world_size(), dist.get_rank()
        _logger.info('Process %d of %d on %s', rank, world_size, device)
    return device, rank, world_size


def native_amp(device, amp_dtype='float16'):
    """(autocast factory, loss scaler or None) of torch.amp: float16 with a loss scaler on GPUs,
    bfloat16 (no scaler) when asked for and always on CPUs."""
    dtype = torch.bfloat16 if amp_dtype == 'bfloat16' or device.type == 'cpu' else torch.float16
    if device.type == 'cpu' and amp_dtype == 'float16':
        _logger.info('mixed precision on CPU runs in bfloat16')
    scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler
