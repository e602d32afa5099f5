#!/usr/bin/env python3
"""Export a model to ONNX (opset 17 by default) and check it against PyTorch with onnxruntime.

    python -m tools.export_onnx --model volo_d1 --checkpoint d1_224_84.2.pth.tar --img-size 224 --out volo_d1.onnx

Needs `pip install onnx onnxruntime onnxscript`. The outlook attention of this repo exports without
Col2Im, so opset 17 (and TensorRT) work.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
import timm
import torch

import models  # noqa: F401
from engine import DiskFullError, check_outputs, check_writable_folder
from utils import CheckpointError, load_pretrained_weights
from utils.cli import UsageError, run_cli
from utils.config import positive_int
from utils.log import setup_logging

_logger = logging.getLogger('export_onnx')


def export(model, img_size, path, opset=17, batch=2, optimize=True):
    """Export `model` (eval) and return (onnx opset, max abs difference to PyTorch on random input).
    optimize=False skips the exporter's graph optimisation (constant folding and the like), most of
    the export's time on a CPU; onnxruntime optimises the graph again when it loads it."""
    import onnx
    import onnxruntime as ort
    model = model.eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, opset_version=opset, input_names=['images'], output_names=['logits'],
                          optimize=optimize)
        expected = model(x).numpy()
    graph = onnx.load(path)
    version = max(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx'))
    if version != opset:
        raise RuntimeError(f'{path}: the exporter wrote opset {version}, not {opset}')
    got = ort.InferenceSession(path).run(None, {'images': x.numpy()})[0]
    return version, float(np.abs(got - expected).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='volo_d1')
    p.add_argument('--checkpoint', default='')
    p.add_argument('--num-classes', type=positive_int, default=None)
    p.add_argument('--img-size', type=positive_int, default=224)
    p.add_argument('--opset', type=int, default=17)
    p.add_argument('--out', required=True)
    p.add_argument('--no-optimize', action='store_true', help="skip the exporter's graph optimisation (faster)")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)
    check_outputs(reads=[('--checkpoint', args.checkpoint)], writes=[('--out', args.out, None)])
    check_writable_folder(os.path.dirname(os.path.abspath(args.out)), '--out', named=args.out)
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    try:
        model = timm.create_model(args.model, img_size=args.img_size, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f'--model {args.model} at --img-size {args.img_size}: {e}') from None
    if args.checkpoint:
        load_pretrained_weights(model, args.checkpoint)
    start = time.perf_counter()
    version, diff = export(model, args.img_size, args.out, args.opset, optimize=not args.no_optimize)
    print(f'{args.out}: opset {version}, max |onnxruntime - torch| = {diff:.2e} '
          f'({time.perf_counter() - start:.0f} s)')
    return diff


def cli(argv=None):
    """main(argv); a checkpoint or argument that cannot work is one line and exit code 2; exit code 1
    when onnxruntime's output differs from PyTorch's by 1e-4 or more."""
    diff = run_cli(main, argv, (UsageError, CheckpointError, DiskFullError), _logger)
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == '__main__':
    cli()
