"""Reading checkpoints safely and loading them into models at any resolution and class count.

Nothing here knows a model family: each model file registers its hooks (layers/model_hooks.py):
`checkpoint_filter_fn(state_dict, model)` (timm's convention), `checkpoint_variant(state_dict)` for
the wrong-variant message and its variant names.
MindSpore `.ckpt` files (MindCV's weights) are recognised by their content and read without
MindSpore (layers/mindspore_ckpt.py); they carry numerics='mindcv'. `.safetensors` files are read
with safetensors (no pickle), their metadata supplying the model's settings.
"""
import argparse
import collections
import json
import logging
import os
import pickle
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
import yaml

from layers import model_hooks
from layers.mindspore_ckpt import (MAX_TENSOR_DIMS, MindSporeCheckpointError, looks_like_mindspore_checkpoint,
                             read_mindcv_checkpoint)

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
    """A checkpoint file, or a training run directory (its model_best / last checkpoint, said in the
    log; --resume takes a run directory's newest instead: engine.find_resume)."""
    if os.path.isdir(path):
        for name in RUN_DIR_CHECKPOINTS:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                _logger.info('%s is a run directory: using %s', path, candidate)
                return candidate
        raise CheckpointError(
            f'{path} is a directory without {" or ".join(RUN_DIR_CHECKPOINTS)}: pass a checkpoint file')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    return path


def describe_non_checkpoint(path: str) -> Optional[str]:
    """What a file looks like when it is not a PyTorch checkpoint (zip archive or legacy pickle),
    from its first bytes; None when it may be one."""
    with open(path, 'rb') as f:
        head = f.read(512)
    if not head:
        return 'an empty file'
    if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):
        return None  # torch.save's zip archive, or its legacy pickle format
    if head.startswith(b'\x1f\x8b'):
        return 'gzip-compressed data'
    stripped = head.lstrip()
    if stripped[:1] in (b'{', b'['):
        return 'JSON text'
    try:
        head.decode('utf-8')
        return 'a text file'
    except UnicodeDecodeError:
        return 'unrecognised binary data'


def _is_torch_file(path):
    with open(path, 'rb') as f:
        head = f.read(4)
    return head.startswith(b'PK\x03\x04') or head.startswith(b'\x80')


def load_mindspore(path: str) -> dict:
    """A MindSpore .ckpt as a checkpoint dict: state_dict (and state_dict_ema) in this repository's
    names, numerics='mindcv'."""
    try:
        weights = read_mindcv_checkpoint(path)
    except MindSporeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    _logger.info('%s holds MindCV weights: models.numerics_kwargs(name, \'mindcv\') builds a model with MindCV\'s '
                 'numerics (validate.py does so itself)', path)
    checkpoint = {'state_dict': weights.state_dict, 'numerics': 'mindcv'}
    if weights.ema is not None:
        checkpoint['state_dict_ema'] = weights.ema
    return checkpoint


def safetensors_header(path: str) -> Optional[int]:
    """The header length a file claims when it has safetensors' layout (an 8-byte little-endian
    header length, then a JSON header), else None."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b'{':
        return None
    return int.from_bytes(head[:8], 'little')


def looks_like_safetensors(path: str) -> bool:
    claimed = safetensors_header(path)
    return claimed is not None and 0 < claimed <= os.path.getsize(path) - 8


def _metadata_value(path, metadata, key, parse, expected):
    """A metadata field parsed with `parse`, or a CheckpointError naming the file and the field."""
    try:
        return parse(metadata[key])
    except (ValueError, TypeError, RecursionError):
        raise CheckpointError(f'{path}: metadata field {key} must be {expected}, '
                              f'found {metadata[key][:80]!r}') from None


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _class_names(text):
    names = json.loads(text)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(text)
    return names


def _model_name(text):
    """A name in timm's registry (this repository's or timm's own), never a path or a hub source."""
    if not text or any(c in text for c in ':/\\') or text.strip() != text:
        raise ValueError(text)
    return text


def load_safetensors(path: str) -> dict:
    """A .safetensors file as a checkpoint dict: state_dict, plus what tools/export_weights.py puts
    in the metadata (model name, image size, class count, class names, numerics). No pickle."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
            deep = next((k for k in f.keys() if len(f.get_slice(k).get_shape()) > MAX_TENSOR_DIMS), None)
            if deep is not None:
                raise CheckpointError(f'{path}: tensor {deep} has {len(f.get_slice(deep).get_shape())} dimensions; '
                                      f'network weights have at most {MAX_TENSOR_DIMS}')
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'cannot read {path} as safetensors: {e}') from None
    checkpoint = {'state_dict': state_dict}
    args = {}
    for key, parse, expected in (('model', _model_name, "a model name of this repository or timm's registry"),
                                 ('img_size', _positive_int, 'a positive whole number'),
                                 ('num_classes', _positive_int, 'a positive whole number')):
        if key in metadata:
            args[key] = _metadata_value(path, metadata, key, parse, expected)
    if args:
        checkpoint['args'] = argparse.Namespace(**args)
    if metadata.get('class_names'):
        checkpoint['class_names'] = _metadata_value(path, metadata, 'class_names', _class_names,
                                                    'a JSON list of class names')
    if metadata.get('numerics'):
        checkpoint['numerics'] = metadata['numerics']
    return checkpoint


def safe_load(path: str):
    """torch.load in weights-only mode with the allow-list above; code in a pickle never runs.
    MindSpore checkpoints (by content, or a .ckpt name) are parsed as protobuf; safetensors files
    (by content) are read with safetensors; a .safetensors name with other content is refused."""
    path = resolve_checkpoint_path(path)
    if looks_like_safetensors(path):
        return load_safetensors(path)
    claimed = safetensors_header(path)
    if claimed is not None and claimed > os.path.getsize(path) - 8:
        raise CheckpointError(f'{path}: its safetensors header claims {claimed} bytes, more than the whole file '
                              f'({os.path.getsize(path)} bytes): the file is truncated or damaged')
    if path.endswith('.safetensors'):
        raise CheckpointError(f'{path} is named .safetensors but is not a safetensors file (it looks like '
                              f'{describe_non_checkpoint(path) or "a pickled PyTorch checkpoint"}); nothing in it '
                              f'was loaded or executed')
    if looks_like_mindspore_checkpoint(path) or (path.endswith('.ckpt') and not _is_torch_file(path)):
        return load_mindspore(path)
    looks_like = describe_non_checkpoint(path)
    if looks_like is not None:
        raise CheckpointError(f'{path} is not a PyTorch checkpoint: it looks like {looks_like}')
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
    except Exception as e:  # noqa: BLE001 - damaged bytes make the unpickler fail in many ways (IndexError, ...)
        raise CheckpointError(f'cannot read checkpoint {path} (truncated or not a PyTorch checkpoint): '
                              f'{type(e).__name__}: {e}') from None


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


class CheckpointContents(NamedTuple):
    path: str                      # the file that was read
    state_dict: Dict[str, torch.Tensor]
    train_args: Optional[dict]     # the training arguments (checkpoint's `args`, or the run's args.yaml)
    class_names: Optional[list]    # the training classes, in index order, when the checkpoint records them
    numerics: Optional[str] = None  # 'mindcv' for MindCV weights (models.numerics_kwargs builds for them)
    task: Optional[str] = None     # 'segmentation' / 'detection' for train_seg.py / train_det.py checkpoints
    label_to_category: Optional[list] = None  # a detector's dataset category id of each label (0: background)


def read_checkpoint(checkpoint_path: str, use_ema: bool = False) -> CheckpointContents:
    """Read a checkpoint file or run directory once: its model weights and, for a training
    checkpoint, the arguments it was trained with."""
    path = resolve_checkpoint_path(checkpoint_path)
    checkpoint = safe_load(path)
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema, path=path)
    train_args = None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('args'), argparse.Namespace):
        train_args = vars(checkpoint['args'])
    else:
        args_yaml = os.path.join(os.path.dirname(path), 'args.yaml')
        if os.path.isfile(args_yaml):
            with open(args_yaml) as f:
                loaded = yaml.safe_load(f)
            train_args = loaded if isinstance(loaded, dict) else None
    recorded = checkpoint if isinstance(checkpoint, dict) else {}
    class_names = recorded.get('class_names')
    label_to_category = recorded.get('label_to_category')
    return CheckpointContents(path, state_dict, train_args, list(class_names) if class_names else None,
                              recorded.get('numerics'), recorded.get('task'),
                              list(label_to_category) if label_to_category else None)


def check_finite(state_dict: Dict[str, torch.Tensor], path: str):
    """A state dict holding NaN or Inf weights is an error naming the tensors."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise CheckpointError(f'{path} holds non-finite (NaN or Inf) weights in {len(bad)} tensor(s): {shown}. '
                              f'Pass allow_non_finite=True (validate.py: --allow-non-finite) to load it anyway.')


def read_state_dict(checkpoint_path: str, use_ema: bool = False) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(resolved file path, model state dict) of a checkpoint file or run directory."""
    contents = read_checkpoint(checkpoint_path, use_ema=use_ema)
    return contents.path, contents.state_dict


def _classifier_names(model):
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier', 'head')
    return (names,) if isinstance(names, str) else tuple(names)


def _describe(model, state_dict):
    hooks = model_hooks(model)
    return hooks.checkpoint_variant(state_dict) if hooks else None


def load_pretrained_weights(model, checkpoint_path: str, use_ema: bool = False, strict: bool = True,
                            num_classes: Optional[int] = None, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                            allow_non_finite: bool = False, adapt: bool = True):
    """Load a release or training checkpoint into `model`.

    The model file's `checkpoint_filter_fn` adapts the state dict (pos_embed resized to the model's
    grid). A classifier of another class count is an error unless `num_classes` (the model's) is
    given or strict=False: then the heads stay as initialised. `state_dict`: the checkpoint's,
    already read by read_checkpoint, so that a large file is not read twice. NaN or Inf weights are
    an error unless allow_non_finite. adapt=False (resuming) loads the file exactly as it is: no
    resizing, no fresh heads. Returns torch's (missing, unexpected) keys.
    """
    if state_dict is None:
        path, state_dict = read_state_dict(checkpoint_path, use_ema=use_ema)
    else:
        path, state_dict = checkpoint_path, dict(state_dict)
    if not allow_non_finite:
        check_finite(state_dict, path)
    model_classes = getattr(model, 'num_classes', None)
    if num_classes is not None and model_classes is not None and num_classes != model_classes:
        raise ValueError(f'num_classes={num_classes} but the model was built with {model_classes} classes')
    hooks = model_hooks(model)
    if adapt and hooks is not None:
        state_dict = hooks.checkpoint_filter_fn(state_dict, model)
    model_state = model.state_dict()

    # classifier heads whose class count differs: fresh heads, asked for explicitly
    head_keys = [k for k in state_dict if adapt and k.split('.')[0] in _classifier_names(model) and k in model_state
                 and state_dict[k].ndim >= 1 and state_dict[k].shape[0] != model_state[k].shape[0]]
    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state_dict.items()
                  if k in model_state and k not in head_keys and v.shape != model_state[k].shape]
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    if mismatched or (strict and (missing or unexpected)):
        file_kind, model_kind = _describe(model, state_dict), _describe(model, model_state)
        details = [f'{k}: file {a} vs model {b}' for k, a, b in mismatched[:3]]
        details += [f'missing in file: {k}' for k in missing[:3 - len(details)]]
        details += [f'not in model: {k}' for k in unexpected[:max(0, 3 - len(details))]]
        if file_kind and model_kind and file_kind != model_kind:
            raise CheckpointError(
                f'{path} looks like {file_kind}, but the model is {model_kind}; first differences: '
                + '; '.join(details))
        model_name = model_kind if hooks is not None and model_kind in hooks.variants \
            else f'{type(model).__name__} model' + (f' ({model_kind})' if model_kind else '')
        raise CheckpointError(f'{path} does not fit the {model_name} ({len(mismatched)} '
                              f'tensors of other shapes, {len(missing)} missing, {len(unexpected)} unexpected): '
                              + '; '.join(details))
    if head_keys:
        file_classes = state_dict[head_keys[0]].shape[0]
        if strict and num_classes is None:
            raise CheckpointError(
                f'{path} has a {file_classes}-class classifier and the model {model_classes} classes. To load '
                f'everything else and start the classifier heads fresh, pass num_classes={model_classes} '
                f'(main.py: --finetune does this; validate.py: --num-classes); to use the checkpoint\'s '
                f'classifier, build the model with num_classes={file_classes}.')
        log = _logger.info if num_classes is not None else _logger.warning
        log('%s: %d classes in the checkpoint, %s in the model: the classifier heads (%s) start fresh',
            path, file_classes, model_classes, ', '.join(sorted({k.split('.')[0] for k in head_keys})))
        for k in head_keys:
            del state_dict[k]
    result = model.load_state_dict(state_dict, strict=False)
    fresh = {k for k in model_state if k.split('.')[0] in {h.split('.')[0] for h in head_keys}}
    missing_keys = [k for k in result.missing_keys if k not in fresh]
    if missing_keys or result.unexpected_keys:
        _logger.warning('%s: missing keys %s; unexpected keys %s', path, missing_keys, result.unexpected_keys)
    return result


def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """Class count of a checkpoint state dict's classifier head, or None when it has none."""
    head = state_dict.get('head.weight')
    return None if head is None else int(head.shape[0])


def training_step(checkpoint) -> Optional[int]:
    """The step a training checkpoint was written at: its `iteration` (segmentation) or `epoch`
    (classification, and segmentation checkpoints written before they said `iteration`)."""
    for key in ('iteration', 'epoch'):
        if isinstance(checkpoint, dict) and key in checkpoint:
            return int(checkpoint[key])
    return None


def resume_checkpoint(model, path: str, optimizer=None, loss_scaler=None, model_ema=None, checkpoint=None):
    """Restore a training checkpoint written by a trainer; returns the epoch (or, for a checkpoint
    that counts iterations, the iteration) to start from.
    `checkpoint`: the file's contents when already read."""
    if checkpoint is None:
        checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or training_step(checkpoint) is None:
        raise CheckpointError(f'{path} is not a training checkpoint (needs state_dict and epoch or iteration to '
                              f'resume)')
    # exactly as saved (no resizing, no fresh heads); non-finite weights and mismatches are one-line errors
    load_pretrained_weights(model, path, strict=True, state_dict=extract_state_dict(checkpoint, path=path),
                            adapt=False)
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
    epoch = training_step(checkpoint)
    if 'iteration' in checkpoint:
        return epoch  # iterations done: training continues with the next one
    mid_epoch = checkpoint.get('mid_epoch')
    if isinstance(mid_epoch, dict):
        return epoch  # a recovery checkpoint taken during the epoch: the epoch continues (and is evaluated)
    return epoch + 1 if checkpoint.get('version', 1) >= 2 else epoch
