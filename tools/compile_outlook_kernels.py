#!/usr/bin/env python3
"""Compile the fused outlook-attention kernels for an NVIDIA architecture, on any machine.

    python -m tools.compile_outlook_kernels --arch 90 --model volo_d1 -b 128 --dtype bf16

Triton lowers to PTX and ptxas (shipped inside the triton wheel) assembles it without a GPU. This
catches kernels that Triton's interpreter runs but its compiler rejects, and reports each kernel's
registers and spills at the model's stage-1 shapes, with the specialisations Triton's launcher
makes at run time (integers divisible by 16 and 16-byte aligned tensors marked as such).
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
    sys.exit('compile_outlook_kernels.py: unset TRITON_INTERPRET; the interpreter compiles nothing')

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from layers import outlook_triton
from models import volo

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32, 'fp64': torch.float64}
TYPE_NAMES = {torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float32: 'fp32', torch.float64: 'fp64'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', type=int, default=90, help='compute capability x10: 80 (A100), 90 (H100/H200)')
    p.add_argument('--model', default='volo_d1', choices=sorted(volo.VARIANTS))
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--dtype', choices=sorted(DTYPES), default='bf16')
    return p.parse_args(argv)


def stage1_launches(args):
    """The kernel launches of one stage-1 outlooker, planned on meta tensors."""
    cfg = volo.VARIANTS[args.model]
    dim, heads = cfg['embed_dims'][0], cfg['num_heads'][0]
    k, s, p = 3, 2, 1
    H = W = args.img_size // 8
    h, w = math.ceil(H / s), math.ceil(W / s)
    dtype = DTYPES[args.dtype]

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device='meta')
    v, out, grad, grad_v = (empty(args.batch_size, H, W, dim) for _ in range(4))
    logits, prob, grad_logits = (empty(args.batch_size, h, w, heads, k * k, k * k) for _ in range(3))
    scale = empty(1, dt=torch.float64 if dtype == torch.float64 else torch.float32)
    return (outlook_triton.forward_launches(v, logits, out, prob, scale, k, s, p)
            + outlook_triton.backward_launches(grad, v, prob, grad_v, grad_logits, scale, k, s, p))


def specialise(kernel, args, meta):
    """(signature, constexprs, attrs) as Triton's launcher would derive them for these arguments."""
    signature, constexprs, attrs = {}, dict(meta), {}
    names = [n for n in kernel.arg_names if n not in meta]
    for name, value in zip(names, args):
        index = (kernel.arg_names.index(name),)
        if isinstance(value, torch.Tensor):
            signature[name] = '*' + TYPE_NAMES[value.dtype]
            attrs[index] = [['tt.divisibility', 16]]
        elif value == 1:
            constexprs[name] = 1
        else:
            signature[name] = 'i32' if -2 ** 31 <= value < 2 ** 31 else 'i64'
            if value % 16 == 0:
                attrs[index] = [['tt.divisibility', 16]]
    for name in constexprs:
        signature[name] = 'constexpr'
    return signature, {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}, attrs


def ptxas_report(ptx, arch):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`."""
    try:  # the one Triton itself assembles with (Triton >= 3.5 takes the architecture)
        ptxas = get_ptxas(arch).path
    except TypeError:
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'kernel.ptx')
        with open(path, 'w') as f:
            f.write(ptx)
        log = subprocess.run([ptxas, f'--gpu-name=sm_{arch}a' if arch >= 90 else f'--gpu-name=sm_{arch}', '-v', path,
                              '-o', os.path.join(tmp, 'kernel.cubin')],
                             capture_output=True, text=True)
    if log.returncode:
        raise RuntimeError(f'ptxas failed: {log.stderr.strip()}')
    log = log.stderr
    registers = int(re.search(r'Used (\d+) registers', log).group(1))
    stores, loads = (int(x) for x in re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log).groups())
    return registers, stores, loads


def main(argv=None):
    args = parse_args(argv)
    target = GPUTarget('cuda', args.arch, 32)
    print(f'{args.model} stage 1, batch {args.batch_size}, {args.img_size} px, {args.dtype}, sm_{args.arch}')
    for name, grid, kernel_args, meta in stage1_launches(args):
        kernel = outlook_triton._KERNELS[name]
        signature, constexprs, attrs = specialise(kernel, kernel_args, meta)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target)
        registers, stores, loads = ptxas_report(compiled.asm['ptx'], args.arch)
        print(f'{name:<11} grid {grid[0]}x{grid[1]}  registers {registers}  spill stores {stores} B  '
              f'spill loads {loads} B  cubin {len(compiled.asm["cubin"])} B')


if __name__ == '__main__':
    main()
