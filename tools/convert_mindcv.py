#!/usr/bin/env python3
"""Convert a MindCV (MindSpore) VOLO or Visformer checkpoint into a PyTorch checkpoint of this
repository, without MindSpore.

    python -m tools.convert_mindcv visformer_tiny_v2-6711a758.ckpt visformer_tiny_v2_mindcv.pth.tar \
        --model visformer_tiny_v2
    python -m tools.convert_mindcv volo_d1-177_1251_v2.ckpt volo_d1_mindcv.pth.tar --model volo_d1

The output (a .pth.tar, or weights only when its name ends in .safetensors) holds the weights in this
repository's key names and `numerics: 'mindcv'` (validate.py and
`models.numerics_kwargs` then build the model with MindCV's tanh GELU, LayerNorm eps 1e-7 and, for
VOLO, the class-token head only) and the model name. The weights are checked by loading them strictly into
the model first; what was mapped and dropped is printed.
"""
import argparse
import os
import sys

import timm
import torch
from safetensors.torch import save

from engine import DiskFullError, write_atomically
from engine.files import write_staged
from models import MINDCV_MODELS, check_file_settings, numerics_kwargs
from utils import CheckpointError, checkpoint_num_classes, load_pretrained_weights
from layers.mindspore_ckpt import MindSporeCheckpointError, describe_dropped, read_mindcv_checkpoint

def convert(src, dst, model_name, use_ema=False):
    """Read src, load it strictly into `model_name` built with MindCV's numerics, write dst
    atomically; returns (model, weights)."""
    weights = read_mindcv_checkpoint(src)
    state_dict = weights.ema if use_ema and weights.ema is not None else weights.state_dict
    if use_ema and weights.ema is None:
        print(f'{src} holds no EMA weights; converting the regular ones', file=sys.stderr)
    num_classes = checkpoint_num_classes(state_dict) or 0
    # the resolution the weights were trained at, from the (last) position embedding's grid
    img_size = None
    if model_name.startswith('volo') and state_dict.get('pos_embed') is not None:
        img_size = int(state_dict['pos_embed'].shape[1]) * 16          # (1, H, W, C) at stride 16
    pos_keys = sorted(k for k in state_dict if k.startswith('pos_embed') and k[len('pos_embed'):].isdigit())
    if model_name.startswith('visformer') and pos_keys:
        img_size = int(state_dict[pos_keys[-1]].shape[2]) * 32          # (1, C, H, W), last stage at stride 32
    kwargs = dict(num_classes=num_classes, **numerics_kwargs(model_name, 'mindcv'))
    if img_size:
        kwargs['img_size'] = img_size
    try:  # the size its position embedding implies, checked against the file before a model is built
        check_file_settings(model_name, state_dict, src, **kwargs)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = timm.create_model(model_name, **kwargs)
    load_pretrained_weights(model, src, strict=True, state_dict=state_dict)
    if dst.endswith('.safetensors'):  # weights only, the settings in the metadata (as tools/export_weights.py)
        metadata = {'format': 'pt', 'model': model_name, 'numerics': 'mindcv', 'num_classes': str(num_classes),
                    'source': os.path.basename(src)}
        if img_size:
            metadata['img_size'] = str(img_size)
        write_atomically(dst, save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=metadata))
    else:
        checkpoint = {'state_dict': model.state_dict(), 'numerics': 'mindcv', 'arch': model_name,
                      'source': os.path.basename(src)}
        os.replace(write_staged(dst, lambda f: torch.save(checkpoint, f)), dst)
    return model, weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='MindSpore .ckpt file')
    p.add_argument('dst', help='PyTorch checkpoint to write')
    p.add_argument('--model', required=True, choices=MINDCV_MODELS)
    p.add_argument('--use-ema', action='store_true', help='convert the EMA weights when the file holds them')
    args = p.parse_args(argv)
    if not os.path.isfile(args.src):
        p.error(f'{args.src}: no such file')
    if os.path.dirname(os.path.abspath(args.dst)) and not os.path.isdir(os.path.dirname(os.path.abspath(args.dst))):
        p.error(f'{args.dst}: its folder does not exist')
    try:
        model, weights = convert(args.src, args.dst, args.model, args.use_ema)
    except (CheckpointError, MindSporeCheckpointError, DiskFullError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    mapped = sum(1 for k in weights.state_dict if not k.endswith('num_batches_tracked'))
    print(f'{args.src} -> {args.dst}: {args.model}, {mapped} tensors mapped (gamma/beta/moving_mean/moving_variance '
          f'renamed; num_batches_tracked added), {sum(t.numel() for t in model.parameters()):,} parameters; '
          f'dropped: {describe_dropped(weights)}; numerics: mindcv (tanh GELU'
          f'{", LayerNorm eps 1e-7, class-token head only" if args.model.startswith("volo") else ""})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
