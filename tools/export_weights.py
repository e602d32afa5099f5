#!/usr/bin/env python3
"""Write a checkpoint's model weights as .safetensors: tensors only (no pickle, nothing to execute),
with the model name, image size, class count, class names and numerics in the metadata, so that
validate.py and load_pretrained_weights read it like the checkpoint it came from.

    python -m tools.export_weights output/train/<run>/ volo_d1_run.safetensors
    python -m tools.export_weights output/train/<run>/model_best.pth.tar best_ema.safetensors --use-ema
    python -m tools.export_weights d1_224_84.2.pth.tar volo_d1_224.safetensors --model volo_d1 --img-size 224
"""
import argparse
import json
import os
import sys

from safetensors.torch import save

from engine import DiskFullError, write_atomically
from utils import CheckpointError, checkpoint_num_classes, read_checkpoint


def export(checkpoint, out, use_ema=False, model=None, img_size=None):
    """Returns the metadata written."""
    contents = read_checkpoint(checkpoint, use_ema=use_ema)
    args = contents.train_args or {}
    metadata = {'format': 'pt', 'source': os.path.basename(contents.path)}
    model = model or args.get('model')
    img_size = img_size or args.get('img_size')
    num_classes = checkpoint_num_classes(contents.state_dict) or args.get('num_classes')
    for key, value in (('model', model), ('img_size', img_size), ('num_classes', num_classes),
                       ('numerics', contents.numerics)):
        if value is not None:
            metadata[key] = str(value)
    if contents.class_names:
        metadata['class_names'] = json.dumps(contents.class_names)
    # one contiguous tensor per key (safetensors stores no shared or strided storage)
    tensors = {k: v.detach().contiguous().clone() for k, v in contents.state_dict.items()}
    write_atomically(out, save(tensors, metadata=metadata))
    return metadata


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='checkpoint file (any format load_pretrained_weights reads) or run directory')
    p.add_argument('out', help='.safetensors file to write')
    p.add_argument('--use-ema', action='store_true', help='the EMA weights of a training checkpoint')
    p.add_argument('--model', default=None, help="model name for the metadata (default: the checkpoint's)")
    p.add_argument('--img-size', type=int, default=None, help="image size for the metadata (default: the checkpoint's)")
    args = p.parse_args(argv)
    if not args.out.endswith('.safetensors'):
        p.error(f'{args.out}: the output name must end in .safetensors')
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        p.error(f'{args.out}: folder {folder} does not exist')
    try:
        metadata = export(args.checkpoint, args.out, args.use_ema, args.model, args.img_size)
    except (CheckpointError, DiskFullError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    shown = {k: v for k, v in metadata.items() if k != 'class_names'}
    print(f'{args.out}: weights only, metadata {shown}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
