"""Writes MindSpore-format checkpoints for the tests (MindSpore itself wrote the fixtures in
tests/fixtures/; this writer, checked against them, makes the full-size and split-record files)."""
import binascii

import torch

from layers.mindspore_ckpt import TENSOR_TYPES, _message_classes

TYPE_NAMES = {torch_dtype: name for name, (_, torch_dtype) in TENSOR_TYPES.items()}


def mindcv_names(model):
    """The model's state dict in MindCV's names: norm layers' weight/bias/running stats as
    gamma/beta/moving_mean/moving_variance, no num_batches_tracked."""
    norms = {name for name, m in model.named_modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d))}
    renames = {'weight': 'gamma', 'bias': 'beta', 'running_mean': 'moving_mean', 'running_var': 'moving_variance'}
    out = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition('.')
        if leaf == 'num_batches_tracked':
            continue
        out[f'{module}.{renames[leaf]}' if module in norms and leaf in renames else key] = value
    return out


def write_mindspore_checkpoint(path, tensors, split=None, crc=False):
    """tensors: {name: torch tensor}; split: {name: n} stores that tensor as n consecutive records."""
    Checkpoint = _message_classes()
    chunks = []
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        content = raw.astype(raw.dtype.newbyteorder('<')).tobytes()
        pieces = (split or {}).get(name, 1)
        step = -(-len(content) // pieces)
        for i in range(pieces):
            msg = Checkpoint()
            value = msg.value.add(tag=name)
            value.tensor.dims.extend(list(t.shape))
            value.tensor.tensor_type = TYPE_NAMES[t.dtype]
            value.tensor.tensor_content = content[i * step:(i + 1) * step]
            chunks.append(msg.SerializeToString())
    data = b''.join(chunks)
    if crc:
        data += b'crc_num' + binascii.crc32(data).to_bytes(10, 'big')
    with open(path, 'wb') as f:
        f.write(data)
    return path
