"""Device, process group, seeds and mixed precision, resolved once per process for every script."""
import logging
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import NativeScaler

from utils.cli import UsageError

_logger = logging.getLogger(__name__)


class DeviceError(UsageError):
    """A device was asked for that this machine does not have."""


def select_device(name=None, local_rank=0):
    """`name`: None picks CUDA when present; 'cuda', 'cuda:N' or 'cpu'."""
    use_cuda = torch.cuda.is_available() if name is None else name.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise DeviceError(f'--device {name} was asked for but no CUDA device is available')
    if not use_cuda:
        return torch.device('cpu')
    device = torch.device(name if name and ':' in name else f'cuda:{local_rank}')
    torch.cuda.set_device(device)
    return device


def init_distributed(device=None, local_rank=0):
    """(device, rank, world size): torchrun's env:// rendezvous when WORLD_SIZE > 1 (NCCL on GPUs,
    gloo on CPUs)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    device = select_device(device, int(os.environ.get('LOCAL_RANK', local_rank)))
    if world_size > 1:
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo', init_method='env://')
        world_size, rank = dist.get_world_size(), dist.get_rank()
        _logger.info('Process %d of %d on %s', rank, world_size, device)
    return device, rank, world_size


@dataclass(frozen=True)
class Amp:
    """Mixed precision as resolved: the autocast factory, the loss scaler (float16 only), which
    implementation ('native', 'apex' or None for float32) and native AMP's dtype."""
    autocast: Callable = nullcontext
    loss_scaler: Optional[NativeScaler] = None
    kind: Optional[str] = None
    dtype: Optional[str] = None  # 'float16' or 'bfloat16' for native AMP


def native_amp(device, amp_dtype=None):
    """torch.amp in `amp_dtype`: float16 with the loss scaler (torch.amp.GradScaler, on the CPU as on
    GPUs), or bfloat16 without one. None: float16 on GPUs, bfloat16 on CPUs."""
    if amp_dtype is None:
        amp_dtype = 'bfloat16' if device.type == 'cpu' else 'float16'
        if device.type == 'cpu':
            _logger.info('mixed precision on CPU runs in bfloat16 (--amp-dtype float16 for float16 with the loss '
                         'scaler, as on GPUs)')
    dtype = torch.float16 if amp_dtype == 'float16' else torch.bfloat16
    scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return Amp(partial(torch.autocast, device_type=device.type, dtype=dtype), scaler, 'native', amp_dtype)


def resolve_amp(args, device, training=True):
    """--amp / --native-amp / --apex-amp and --amp-dtype. NVIDIA apex is used only to train on
    CUDA where it is importable; everywhere else these mean native torch.amp."""
    if not (args.amp or args.native_amp or args.apex_amp):
        return Amp()
    if args.apex_amp:
        if not training:
            _logger.info('--apex-amp: evaluating with native torch.amp')
        else:
            try:
                from apex import amp as apex_amp  # noqa: F401
                if device.type == 'cuda':
                    return Amp(kind='apex')
                _logger.warning('--apex-amp: apex needs CUDA; using native torch.amp instead')
            except ImportError:
                _logger.warning('--apex-amp: NVIDIA apex is not installed; using native torch.amp instead')
    return native_amp(device, args.amp_dtype)


@dataclass(frozen=True)
class Runtime:
    """What a process is: its device, rank and the world it trains in, and its mixed precision."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: Amp = Amp()

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def distributed_model(model, runtime):
    """`model` in DistributedDataParallel when the run has several processes (on its GPU, or on
    the CPU), else as it is."""
    if not runtime.distributed:
        return model
    device = runtime.device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)


def sync_batchnorm(model, runtime, enabled):
    """--sync-bn: the model's BatchNorm layers become SyncBatchNorm when several processes train on
    GPUs; elsewhere (torch's SyncBatchNorm runs on GPUs only) they stay, with a warning."""
    if not (enabled and runtime.distributed):
        return model
    if runtime.device.type != 'cuda':
        _logger.warning('SyncBatchNorm needs CUDA: on CPU every process keeps its own BatchNorm statistics')
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def setup_runtime(args, training=True):
    """Device and process group (torchrun's env:// when WORLD_SIZE > 1), seeds offset by rank, and
    mixed precision, from the shared options (engine/options.py)."""
    device, rank, world_size = init_distributed(args.device, getattr(args, 'local_rank', 0))
    seed = getattr(args, 'seed', None)
    if seed is not None:
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        torch.manual_seed(seed + rank)
    if training:  # evaluation keeps exact float32 (validate.py, which sets up no runtime, does too)
        configure_cuda(device)
    runtime = Runtime(device, rank, world_size, resolve_amp(args, device, training))
    if training and rank == 0:
        _logger.info('Mixed precision: %s', ' '.join(filter(None, (runtime.amp.kind, runtime.amp.dtype))) or
                     'off (float32)')
    return runtime


def configure_cuda(device):
    """On a GPU, what timm's and DeiT's trainers set: cuDNN picks its fastest kernels for the
    shapes it sees (cudnn.benchmark), and float32 matmuls and convolutions may use TF32."""
    if device.type != 'cuda':
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
