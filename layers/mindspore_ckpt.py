"""MindSpore `.ckpt` files (MindCV's weights) read without MindSpore.

The format is a protobuf stream of `Checkpoint` messages (one per parameter, concatenated): each
value has a `tag` (the parameter name) and a `TensorProto` (dims, a type name, raw little-endian
row-major bytes). A parameter larger than 512 MiB is stored as several consecutive values with the
same tag whose bytes are joined. `save_checkpoint(..., crc_check=True)` appends `crc_num` and a
10-byte big-endian CRC32 of everything before it. Parsing is protobuf's: nothing in the file is
ever executed.

MindCV names equal this repository's keys except in normalisation layers (gamma/beta/moving_mean/
moving_variance); training files also hold optimizer moments, step and learning-rate entries and
EMA copies, which `mindcv_state_dict` separates from the network.
"""
import binascii
import functools
import logging
import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

_logger = logging.getLogger(__name__)

CRC_MARK = b'crc_num'
# more dimensions than any network weight has: a record claiming them is damaged or crafted
MAX_TENSOR_DIMS = 8
CRC_TRAILER = len(CRC_MARK) + 10

# MindSpore type names -> (numpy dtype, torch dtype); bfloat16 goes through int16 bits
TENSOR_TYPES = {
    'Float32': (np.float32, torch.float32), 'Float16': (np.float16, torch.float16),
    'BFloat16': (np.int16, torch.bfloat16), 'Float64': (np.float64, torch.float64),
    'Int8': (np.int8, torch.int8), 'Int16': (np.int16, torch.int16), 'Int32': (np.int32, torch.int32),
    'Int64': (np.int64, torch.int64), 'UInt8': (np.uint8, torch.uint8), 'UInt16': (np.uint16, torch.uint16),
    'UInt32': (np.uint32, torch.uint32), 'UInt64': (np.uint64, torch.uint64), 'Bool': (np.bool_, torch.bool),
}


class MindSporeCheckpointError(ValueError):
    """The file is not a readable MindSpore checkpoint (truncated, encrypted, another format)."""


@functools.lru_cache(maxsize=None)
def _message_classes():
    """The proto2 messages of MindSpore's checkpoint.proto, built from a descriptor at run time."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name='volo_mindspore_checkpoint.proto', package='volo_ms',
                                               syntax='proto2')

    def field(msg, name, number, kind, label=F.LABEL_OPTIONAL, type_name=None, oneof=None):
        f = msg.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof

    tensor = proto.message_type.add(name='TensorProto')
    field(tensor, 'dims', 1, F.TYPE_INT64, F.LABEL_REPEATED)
    field(tensor, 'tensor_type', 2, F.TYPE_STRING)
    field(tensor, 'tensor_content', 3, F.TYPE_BYTES)
    map_tensor = proto.message_type.add(name='MapTensorProto')
    field(map_tensor, 'tensor', 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, '.volo_ms.TensorProto')
    checkpoint = proto.message_type.add(name='Checkpoint')
    value = checkpoint.nested_type.add(name='Value')
    value.oneof_decl.add(name='value')
    field(value, 'tag', 1, F.TYPE_STRING)
    field(value, 'tensor', 2, F.TYPE_MESSAGE, type_name='.volo_ms.TensorProto', oneof=0)
    field(value, 'maptensor', 3, F.TYPE_MESSAGE, type_name='.volo_ms.MapTensorProto', oneof=0)
    field(checkpoint, 'value', 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, '.volo_ms.Checkpoint.Value')
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName('volo_ms.Checkpoint'))


def looks_like_mindspore_checkpoint(path: str) -> bool:
    """From the first bytes: a protobuf `value` record (field 1, length-delimited) whose own first
    field is a short printable tag, as every MindSpore checkpoint starts."""
    with open(path, 'rb') as f:
        head = f.read(64)
    if len(head) < 4 or head[0] != 0x0A:
        return False
    pos = 1
    while pos < len(head) and head[pos] & 0x80:  # the record's length varint
        pos += 1
    pos += 1
    if pos + 2 > len(head) or head[pos] != 0x0A:
        return False
    tag_len = head[pos + 1]
    tag = head[pos + 2:pos + 2 + min(tag_len, len(head) - pos - 2)]
    return 0 < tag_len < 128 and all(32 <= b < 127 for b in tag)


def _describe_unreadable(path, data):
    if data[:4] == b'PK\x03\x04' or data[:1] == b'\x80':
        return 'a PyTorch checkpoint, not a MindSpore one'
    return ('truncated, encrypted (MindSpore enc_key: decrypt it with MindSpore first) or not a MindSpore '
            'checkpoint')


def read_mindspore_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a MindSpore .ckpt as {name: torch tensor}, in file order (split parameters
    joined). A CRC trailer is checked when present."""
    with open(path, 'rb') as f:
        data = f.read()
    if not data:
        raise MindSporeCheckpointError(f'{path} is empty')
    if len(data) > CRC_TRAILER and data[-CRC_TRAILER:-10] == CRC_MARK:
        stored = int.from_bytes(data[-10:], 'big')
        data = data[:-CRC_TRAILER]
        if binascii.crc32(data) != stored:
            raise MindSporeCheckpointError(f'{path}: CRC check failed (stored {stored}, computed '
                                           f'{binascii.crc32(data)}): the file is damaged')
    from google.protobuf.message import DecodeError
    checkpoint = _message_classes()()
    try:
        checkpoint.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise MindSporeCheckpointError(f'{path} cannot be parsed as a MindSpore checkpoint: '
                                       f'{_describe_unreadable(path, data)} ({e})') from None
    if not checkpoint.value:
        raise MindSporeCheckpointError(f'{path} holds no parameters: {_describe_unreadable(path, data)}')

    parts: Dict[str, List[Tuple[Tuple[int, ...], str, bytes]]] = {}
    for value in checkpoint.value:
        if not value.tag or value.WhichOneof('value') is None:
            raise MindSporeCheckpointError(f'{path}: a record without a name or a tensor: '
                                           f'{_describe_unreadable(path, data)}')
        if value.WhichOneof('value') == 'maptensor':
            _logger.info('%s: skipping map tensor %s (embedding tables are not network weights here)', path,
                         value.tag)
            continue
        t = value.tensor
        parts.setdefault(value.tag, []).append((tuple(t.dims), t.tensor_type, t.tensor_content))

    tensors = {}
    for name, records in parts.items():
        dims, type_name = records[0][0], records[0][1]
        if type_name not in TENSOR_TYPES:
            if type_name == 'str':
                continue  # strings (e.g. a saved config) are not weights
            raise MindSporeCheckpointError(f'{path}: {name} has unknown tensor type {type_name!r}')
        if any(r[0] != dims or r[1] != type_name for r in records[1:]):
            raise MindSporeCheckpointError(f'{path}: the records of the split parameter {name} disagree on '
                                           f'shape or type')
        if len(dims) > MAX_TENSOR_DIMS or any(d < 0 for d in dims):
            raise MindSporeCheckpointError(f'{path}: {name} claims the shape {list(dims)[:MAX_TENSOR_DIMS + 1]}'
                                           f'{" ..." if len(dims) > MAX_TENSOR_DIMS + 1 else ""}: at most '
                                           f'{MAX_TENSOR_DIMS} dimensions of size >= 0 are possible')
        np_dtype, torch_dtype = TENSOR_TYPES[type_name]
        content = b''.join(r[2] for r in records)
        count = math.prod(dims)
        expected = count * np.dtype(np_dtype).itemsize
        if len(content) != expected:
            raise MindSporeCheckpointError(f'{path}: {name} has {len(content)} bytes for shape {list(dims)} of '
                                           f'{type_name} ({expected} expected): the file is truncated or damaged')
        array = np.frombuffer(content, dtype=np.dtype(np_dtype).newbyteorder('<')).reshape(dims).copy()
        tensor = torch.from_numpy(array.astype(np_dtype))
        tensors[name] = tensor.view(torch.bfloat16) if type_name == 'BFloat16' else tensor
    return tensors


# --------------------------------------------------------------------------------------- mapping

NORM_RENAMES = (('.gamma', '.weight'), ('.beta', '.bias'), ('.moving_mean', '.running_mean'),
                ('.moving_variance', '.running_var'))
OPTIMIZER_PREFIX = re.compile(r'^(adam_m|adam_v|moments|momentum|accum|mean_square|mean_grad|moment1|moment2|'
                              r'vhat|accumulators?|linear|lamb_m|lamb_v)\.')
TRAINING_SCALARS = {'global_step', 'learning_rate', 'scale_sense', 'loss_scale', 'current_iterator_step',
                    'last_overflow_iterator_step', 'epoch_num', 'step_num', 'beta1_power', 'beta2_power',
                    'cur_step_num', 'cur_epoch_num'}
EMA_PREFIX = 'ema.'


class MindCVWeights(NamedTuple):
    state_dict: Dict[str, torch.Tensor]              # the network, in this repository's names
    ema: Optional[Dict[str, torch.Tensor]]            # EMA weights when the file holds them
    dropped: Dict[str, int]                           # what was left out, by kind


def _rename(name: str) -> str:
    for old, new in NORM_RENAMES:
        if name.endswith(old):
            return name[:-len(old)] + new
    return name


def _with_bn_counters(state_dict):
    """MindSpore keeps no num_batches_tracked: add it (0) beside every BatchNorm's running_mean."""
    out = {}
    for k, v in state_dict.items():
        out[k] = v
        if k.endswith('.running_mean'):
            out[k[:-len('running_mean')] + 'num_batches_tracked'] = torch.tensor(0, dtype=torch.long)
    return out


def mindcv_state_dict(tensors: Dict[str, torch.Tensor]) -> MindCVWeights:
    """Split a MindCV checkpoint's tensors into the network (renamed to this repository's keys), its
    EMA copy and what is dropped (optimizer moments, step, learning rate, loss scale)."""
    network, ema, dropped = {}, {}, {}
    for name, tensor in tensors.items():
        match = OPTIMIZER_PREFIX.match(name)
        if match:
            kind = f'optimizer state ({match.group(1)}.*)'
        elif name in TRAINING_SCALARS:
            kind = name
        elif name.startswith(EMA_PREFIX):
            ema[_rename(name[len(EMA_PREFIX):])] = tensor.float() if tensor.is_floating_point() else tensor
            continue
        else:
            network[_rename(name)] = tensor.float() if tensor.is_floating_point() else tensor
            continue
        dropped[kind] = dropped.get(kind, 0) + 1
    return MindCVWeights(_with_bn_counters(network), _with_bn_counters(ema) if ema else None, dropped)


def describe_dropped(weights: MindCVWeights) -> str:
    parts = [f'{count} {kind}' if count > 1 else kind for kind, count in sorted(weights.dropped.items())]
    if weights.ema is not None:
        parts.append(f'EMA copy of {len(weights.ema)} tensors (kept apart: use_ema / --use-ema selects it)')
    return ', '.join(parts) if parts else 'nothing'


def read_mindcv_checkpoint(path: str) -> MindCVWeights:
    """A MindCV .ckpt as this repository's state dict(s); one log line says what was dropped."""
    weights = mindcv_state_dict(read_mindspore_checkpoint(path))
    if not weights.state_dict:
        raise MindSporeCheckpointError(f'{path} holds no network weights (only {describe_dropped(weights)})')
    _logger.info('%s: MindSpore checkpoint, %d network tensors; dropped: %s', os.path.basename(path),
                 len(weights.state_dict), describe_dropped(weights))
    return weights
