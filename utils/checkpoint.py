"""Reading checkpoints safely and loading them into models at any resolution and class count."""
import argparse
import collections
import logging
import os
import pickle
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

# What checkpoints written by the reference and timm training scripts hold besides tensors and
# builtins: the run's argparse.Namespace and NumPy scalars (metrics). Nothing else is unpickled.
try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import scalar as _numpy_scalar
SAFE_GLOBALS = [argparse.Namespace, collections.OrderedDict, np.dtype, _numpy_scalar] + [
    type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'bool')]

# Preferred checkpoint names inside a run directory, best first.
RUN_DIR_CHECKPOINTS = ('model_best.pth.tar', 'last.pth.tar')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint file, or a training run directory (its model_best / last checkpoint)."""
    if os.path.isdir(path):
        for name in RUN_DIR_CHECKPOINTS:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise CheckpointError(
            f'{path} is a directory without {" or ".join(RUN_DIR_CHECKPOINTS)}: pass a checkpoint file')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    return path


def fetch_release_file(cfg) -> str:
    """Path of a model config's weights: its local `file`, else its `url` downloaded once into
    torch.hub's checkpoint cache (file:// URLs work too)."""
    if cfg.get('file'):
        return cfg['file']
    url = cfg['url']
    cache_dir = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, os.path.basename(url))
    if not os.path.isfile(target):
        torch.hub.download_url_to_file(url, target, progress=True)
    return target


def safe_load(path: str):
    """torch.load in weights-only mode with the allow-list above; code in a pickle never runs."""
    path = resolve_checkpoint_path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split('\n')
        reason = next((line.strip() for line in detail if 'Unsupported' in line or 'global' in line.lower()),
                      detail[0])
        raise CheckpointError(
            f'refused to load {path}: it needs unpickling beyond tensors, containers and argparse.Namespace '
            f'({reason}). Nothing in it was executed. If you trust the file, convert it to a plain state_dict '
            f'with torch.load(..., weights_only=False) yourself.') from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f'cannot read checkpoint {path}: {e}') from None


def extract_state_dict(checkpoint, use_ema: bool = False, path: str = '<checkpoint>') -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint: EMA ones when asked and present, `module.` stripped."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, expected a dict of tensors')
    if use_ema and isinstance(checkpoint.get('state_dict_ema'), dict):
        state_dict = checkpoint['state_dict_ema']
    elif isinstance(checkpoint.get('state_dict'), dict):
        state_dict = checkpoint['state_dict']
    elif isinstance(checkpoint.get('model'), dict):
        state_dict = checkpoint['model']
    else:
        state_dict = checkpoint
    if use_ema and state_dict is not checkpoint.get('state_dict_ema'):
        _logger.warning('%s has no EMA weights (state_dict_ema); loading the regular ones', path)
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f'{path}: entry {k!r} is a {type(v).__name__}, expected a tensor')
        tensors[k[len('module.'):] if k.startswith('module.') else k] = v
    return tensors


def resize_pos_embed(pos_embed: torch.Tensor, grid) -> torch.Tensor:
    """Bicubic resize of a channels-last (1, H, W, C) position embedding to grid (h, w)."""
    grid = tuple(grid)
    if tuple(pos_embed.shape[1:3]) == grid:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=grid, mode='bicubic',
                            align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def _volo_signature(shapes: Dict[str, tuple]) -> Optional[tuple]:
    """(stem width, dims, blocks per stage) of a VOLO-like state dict, from its key shapes."""
    if 'patch_embed.conv.0.weight' not in shapes or 'network.0.0.norm1.weight' not in shapes:
        return None
    stages = []
    for stage in (0, 2, 3, 4):
        stages.append(len({k.split('.')[2] for k in shapes if k.startswith(f'network.{stage}.')
                           and k.endswith('norm1.weight')}))
    fc1 = shapes.get('network.0.0.mlp.fc1.weight', (0, 1))
    return (shapes['patch_embed.conv.0.weight'][0], shapes['network.0.0.norm1.weight'][0],
            shapes.get('norm.weight', (0,))[0], tuple(stages), fc1[0] // fc1[1])


def describe_variant(shapes: Dict[str, tuple]) -> str:
    """The registered VOLO variant whose layout these shapes have, or a description of them."""
    from models.volo import VARIANTS
    sig = _volo_signature(shapes)
    if sig is None:
        return 'a state dict that is not VOLO-shaped'
    for name, cfg in VARIANTS.items():
        if sig == (cfg['stem_hidden_dim'], cfg['embed_dims'][0], cfg['embed_dims'][-1], tuple(cfg['layers']),
                   cfg['mlp_ratios'][0]):
            return name
    return f'an unknown VOLO layout (stem {sig[0]}, dims {sig[1]}/{sig[2]}, blocks {sig[3]})'


def read_state_dict(checkpoint_path: str, use_ema: bool = False) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(resolved file path, model state dict) of a checkpoint file or run directory."""
    path = resolve_checkpoint_path(checkpoint_path)
    return path, extract_state_dict(safe_load(path), use_ema=use_ema, path=path)


def load_pretrained_weights(model, checkpoint_path: str, use_ema: bool = False, strict: bool = True,
                            num_classes: Optional[int] = None, state_dict: Optional[Dict[str, torch.Tensor]] = None):
    """Load a release or training checkpoint into `model`.

    pos_embed is resized to the model's grid; when the class count differs (num_classes, default the
    model's), the classifier heads are left as initialised. `state_dict`: the checkpoint's, already
    read by read_state_dict, so that a large file is not read twice. Returns torch's (missing,
    unexpected) keys.
    """
    if state_dict is None:
        path, state_dict = read_state_dict(checkpoint_path, use_ema=use_ema)
    else:
        path, state_dict = checkpoint_path, dict(state_dict)
    model_state = model.state_dict()
    model_classes = getattr(model, 'num_classes', None)
    if num_classes is not None and model_classes is not None and num_classes != model_classes:
        raise ValueError(f'num_classes={num_classes} but the model was built with {model_classes} classes')

    if 'pos_embed' in state_dict and 'pos_embed' in model_state:
        ours, theirs = model_state['pos_embed'], state_dict['pos_embed']
        if ours.ndim == theirs.ndim == 4 and ours.shape[-1] == theirs.shape[-1]:
            if ours.shape != theirs.shape:
                _logger.info('resizing pos_embed %s -> %s', tuple(theirs.shape), tuple(ours.shape))
            state_dict['pos_embed'] = resize_pos_embed(theirs, ours.shape[1:3])

    dropped_heads = []
    for head in ('head', 'aux_head'):
        w = state_dict.get(f'{head}.weight')
        ours = model_state.get(f'{head}.weight')
        if w is not None and (ours is None or ours.shape != w.shape):
            dropped_heads += [k for k in list(state_dict) if k.startswith(f'{head}.')]
    if dropped_heads:
        _logger.warning('%s: %d classes in the checkpoint, %s in the model: the classifier heads start fresh',
                     path, state_dict[dropped_heads[0]].shape[0], model_classes)
        for k in dropped_heads:
            del state_dict[k]

    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state_dict.items()
                  if k in model_state and v.shape != model_state[k].shape]
    missing = [k for k in model_state if k not in state_dict and k not in _heads_of(model_state, dropped_heads)]
    unexpected = [k for k in state_dict if k not in model_state]
    if mismatched or (strict and (missing or unexpected)):
        file_kind = describe_variant({k: tuple(v.shape) for k, v in state_dict.items()})
        model_kind = describe_variant({k: tuple(v.shape) for k, v in model_state.items()})
        details = [f'{k}: file {a} vs model {b}' for k, a, b in mismatched[:3]]
        details += [f'missing in file: {k}' for k in missing[:3 - len(details)]]
        details += [f'not in model: {k}' for k in unexpected[:max(0, 3 - len(details))]]
        if mismatched or file_kind != model_kind:
            raise CheckpointError(
                f'{path} looks like {file_kind}, but the model is {model_kind}; first differences: '
                + '; '.join(details))
        raise CheckpointError(f'{path} does not fit the model ({len(missing)} missing, '
                              f'{len(unexpected)} unexpected keys): ' + '; '.join(details))
    result = model.load_state_dict(state_dict, strict=False)
    missing_keys = [k for k in result.missing_keys if k not in _heads_of(model_state, dropped_heads)]
    if missing_keys or result.unexpected_keys:
        _logger.warning('%s: missing keys %s; unexpected keys %s', path, missing_keys, result.unexpected_keys)
    return result


def _heads_of(model_state, dropped):
    """Model keys of the classifier heads that were deliberately not loaded."""
    prefixes = {k.split('.')[0] + '.' for k in dropped}
    return {k for k in model_state if any(k.startswith(p) for p in prefixes)}


def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """Class count of a checkpoint state dict's classifier head, or None when it has none."""
    head = state_dict.get('head.weight')
    return None if head is None else int(head.shape[0])


def resume_checkpoint(model, path: str, optimizer=None, loss_scaler=None, model_ema=None):
    """Restore a training checkpoint written by main.py; returns the epoch to start from."""
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or 'epoch' not in checkpoint:
        raise CheckpointError(f'{path} is not a training checkpoint (needs state_dict and epoch to resume)')
    model.load_state_dict(extract_state_dict(checkpoint, path=path), strict=True)
    if optimizer is not None:
        if 'optimizer' not in checkpoint:
            raise CheckpointError(f'{path} holds no optimizer state; use --no-resume-opt to resume without it')
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if model_ema is not None:
        if 'state_dict_ema' in checkpoint:
            model_ema.module.load_state_dict(extract_state_dict(checkpoint, use_ema=True, path=path), strict=True)
        else:
            _logger.warning('%s has no EMA weights; the EMA restarts from the model weights', path)
    epoch = int(checkpoint['epoch'])
    return epoch + 1 if checkpoint.get('version', 1) >= 2 else epoch
