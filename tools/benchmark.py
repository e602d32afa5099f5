#!/usr/bin/env python3
"""Throughput and peak memory of this repo's models, optionally beside timm's implementation.

    python -m tools.benchmark --model volo_d1 --img-size 224 -b 16 --mode infer --compare-timm
    python -m tools.benchmark --model volo_d1 -b 8 --mode train --compare-timm --threads 2
    python -m tools.benchmark --op outlook_attention -b 16 --compare-timm --threads 2
    python -m tools.benchmark --model volo_d1 -b 128 --mode train --device cuda --precision bf16 \
        --compare-timm [--compile] [--outlook-impl torch]

Both implementations get the same weights and inputs; timings alternate between them and report
medians. Peak memory is that of one step above the memory held before it (weights, optimizer
state): on CUDA the allocator's peak, on CPU the peak of live tensor bytes in torch.profiler's
memory timeline. MFU (model FLOPs utilisation) is the step's matmul and convolution FLOPs, counted by
torch.utils.flop_counter on the unfused model (3x the forward for a training step), over the time,
over the peak: --peak-tflops, or the dense bf16/fp16 peak of a known GPU.
"""
import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models  # noqa: F401  (registers this repo's models)
from engine.files import write_atomically
from models import DenseTrainingForward

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='volo_d1', help='registered model name (this repo)')
    p.add_argument('--op', choices=['outlook_attention'], default=None,
                   help='benchmark one block instead of a whole model')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=16)
    p.add_argument('--mode', choices=['infer', 'train', 'both'], default='both')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--precision', choices=sorted(DTYPES), default='fp32', help='autocast dtype (fp32: none)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--compare-timm', action='store_true', help="also run timm's implementation")
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile both implementations')
    p.add_argument('--outlook-impl', choices=['auto', 'triton', 'torch'], default='auto',
                   help="this repo's outlook attention: fused Triton kernels, PyTorch, or auto (Triton on CUDA)")
    p.add_argument('--peak-tflops', type=float, default=None,
                   help='peak of the device for MFU (default: known GPUs at bf16/fp16 dense)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    p.add_argument('--json', default=None, help='write the results here')
    return p.parse_args(argv)


class TimmVoloTrain(nn.Module):
    """timm's VOLO in training mode, giving what ours gives: (class logits, dense logits).
    timm's forward_train returns the class token's features, so its head is applied here."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if not self.training:
            return self.model(x)
        feats, aux, _ = self.model.forward_train(x)
        return self.model.head(feats), aux


def timm_name(name, img_size):
    if name.startswith('volo_'):
        return f'{name}_224', dict(img_size=img_size)
    return name, dict(img_size=img_size) if 'visformer' not in name else {}


def build_pair(args):
    """(ours, timm's or None), same weights, in train mode."""
    torch.manual_seed(0)
    if args.op == 'outlook_attention':
        from timm.models.volo import OutlookAttention as TimmOutlook
        from models.volo import OutlookAttention
        ours = OutlookAttention(192, 6, kernel_size=3, padding=1, stride=2, outlook_impl=args.outlook_impl)
        ref = TimmOutlook(192, 6, kernel_size=3, padding=1, stride=2) if args.compare_timm else None
    else:
        kwargs = dict(img_size=args.img_size) if args.model.startswith('volo') else {}
        if args.model.startswith('volo'):
            kwargs['mix_token'] = False  # timm's has none; compare the same computation
            kwargs['outlook_impl'] = args.outlook_impl
        ours = timm.create_model(args.model, **kwargs)
        ref = None
        if args.compare_timm:
            name, ref_kwargs = timm_name(args.model, args.img_size)
            ref = timm.create_model(name, **ref_kwargs)
            if args.model.startswith('volo'):
                ref = TimmVoloTrain(ref)
                ref.model.load_state_dict(ours.state_dict(), strict=True)
            else:
                ref.load_state_dict(ours.state_dict(), strict=True)
        if args.model.startswith('volo'):
            ours = DenseTrainingForward(ours)  # the token-labeling training step main.py runs
    if args.grad_checkpointing:
        for m in (ours, ref):
            if m is not None:
                target = m.model if isinstance(m, TimmVoloTrain) else getattr(m, 'module', m)
                target.set_grad_checkpointing(True)
    return ours, ref


def make_input(args, device, batch_size=None):
    batch_size = batch_size or args.batch_size
    if args.op == 'outlook_attention':
        return torch.randn(batch_size, args.img_size // 8, args.img_size // 8, 192, device=device)
    x = torch.randn(batch_size, 3, args.img_size, args.img_size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def loss_of(output, target):
    if isinstance(output, tuple):  # VOLO training output: class logits, dense logits (, box)
        cls, aux = output[0], output[1]
        dense = F.cross_entropy(aux.flatten(0, 1).float(), target.repeat_interleave(aux.shape[1]))
        return F.cross_entropy(cls.float(), target) + 0.5 * dense
    if output.ndim > 2:  # a single block's output
        return output.float().square().mean()
    return F.cross_entropy(output.float(), target)


def make_step(model, args, device, mode):
    """A closure that runs one inference batch or one full training step."""
    x = make_input(args, device)
    target = torch.randint(0, 1000, (args.batch_size,), device=device)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[args.precision])
                if args.precision != 'fp32' else nullcontext())
    runner = torch.compile(model) if args.compile else model
    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                runner(x)
        return step
    model.train()
    if args.op:
        x.requires_grad_(True)
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device=torch.device(device).type, enabled=args.precision == 'fp16')

    def step():
        with autocast:
            loss = loss_of(runner(x), target)
        scaler.scale(loss).backward()
        if optimizer is not None:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        else:
            x.grad = None
            model.zero_grad(set_to_none=True)
    return step


# dense bf16/fp16 tensor-core peaks, TFLOP/s
KNOWN_PEAKS = {'H100': 989., 'H200': 989., 'H800': 989., 'A100': 312., 'L4': 121., 'RTX 4090': 165.}


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if torch.device(device).type != 'cuda' or args.precision == 'fp32':
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_PEAKS.items() if key in name), None)


def forward_flops(model, args):
    """FLOPs of one forward of one input, counted on the meta device with the unfused path."""
    from torch.utils.flop_counter import FlopCounterMode
    twin = copy.deepcopy(model).to('meta').eval()
    for m in twin.modules():
        if hasattr(m, 'outlook_impl'):
            m.outlook_impl = 'torch'
    x = make_input(args, 'meta', batch_size=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        twin(x)
    return counter.get_total_flops()


def add_measure_options(parser, warmup, iters):
    """The options the task benchmarks (tools/benchmark_seg.py, tools/benchmark_det.py) share."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', choices=sorted(DTYPES), default='fp32', help='autocast dtype (fp32: none)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--warmup', type=int, default=warmup)
    parser.add_argument('--iters', type=int, default=iters)
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--json', default=None, help='write the results here')


def measurement_setup(args):
    """(device, autocast factory) of the shared options; sets the CPU threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.precision]
    return device, (lambda: torch.autocast(device.type, dtype=dtype)) if args.precision != 'fp32' else nullcontext


def measure(steps, images, args, device, names=None):
    """{'<name>_s', '<name>_images_per_s', '<name>_peak_mib'} of each step: median seconds,
    `images[step]` over them, and (unless --no-memory) the peak memory. `names` renames a step's
    seconds key ('train' -> 'train_step': 'train_step_s')."""
    names = names or {}
    times = time_alternating(steps, args, device)
    results = {}
    for step, seconds in times.items():
        results[f'{names.get(step, step)}_s'] = seconds
        results[f'{step}_images_per_s'] = images[step] / seconds
    if not args.no_memory:
        for step, run in steps.items():
            results[f'{step}_peak_mib'] = peak_memory_mib(run, device)
        sync(device)
    return results


def report(results, json_path=None):
    """One `key: value` line per result, and the results as JSON at json_path."""
    for key, value in results.items():
        print(f'{key}: {value:.3f}' if isinstance(value, float) else f'{key}: {value}')
    if json_path:
        write_atomically(json_path, json.dumps(results, indent=2).encode())


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def time_alternating(steps, args, device):
    """Median seconds per step for each named step, running them in turn."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    sync(device)
    times = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_mib(step, device):
    """Peak memory of one step above what was allocated before it (model, optimizer state): the
    CUDA allocator's peak, or on the CPU the peak of live tensor bytes in the profiler's memory
    timeline (exact and allocator-independent, unlike the process RSS)."""
    step()  # warm: optimizer state and caches exist before the measured step
    if torch.device(device).type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        name = getattr(action, 'name', str(action))
        if name == 'CREATE':
            live += size
        elif name == 'DESTROY':
            live -= size
        peak = max(peak, live)
    return peak / 2 ** 20


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    ours, ref = build_pair(args)
    impls = {'ours': ours.to(device)}
    if ref is not None:
        impls['timm'] = ref.to(device)
    if args.channels_last and not args.op:
        impls = {k: m.to(memory_format=torch.channels_last) for k, m in impls.items()}
    label = args.op or args.model
    results = []
    modes = ['infer', 'train'] if args.mode == 'both' else [args.mode]
    print(f'# {label} {args.img_size}px batch {args.batch_size} {args.precision} on {device} '
          f'({torch.get_num_threads()} threads), torch {torch.__version__}, timm {timm.__version__}')
    peak = peak_tflops(args, device)
    flops = forward_flops(ours, args) if peak else None
    for mode in modes:
        steps = {name: make_step(m, args, device, mode) for name, m in impls.items()}
        medians = time_alternating(steps, args, device)
        for name, sec in medians.items():
            row = dict(impl=name, target=label, mode=mode, img_size=args.img_size, batch=args.batch_size,
                       precision=args.precision, device=device, ms=sec * 1e3,
                       images_per_s=args.batch_size / sec)
            if peak:
                step_flops = flops * args.batch_size * (3 if mode == 'train' else 1)
                row['mfu'] = step_flops / sec / (peak * 1e12)
            if not args.no_memory:
                row['peak_mib'] = peak_memory_mib(steps[name], device)
            results.append(row)
    if peak:
        print(f'# {flops / 1e9:.2f} GFLOP per image forward, MFU against {peak:.0f} TFLOP/s')
    print(f'{"impl":6} {"mode":6} {"ms/step":>9} {"img/s":>9} {"peak MiB":>9} {"MFU":>6}')
    for r in results:
        mem = f'{r["peak_mib"]:9.0f}' if 'peak_mib' in r else f'{"-":>9}'
        mfu = f'{100 * r["mfu"]:5.1f}%' if 'mfu' in r else f'{"-":>6}'
        print(f'{r["impl"]:6} {r["mode"]:6} {r["ms"]:9.1f} {r["images_per_s"]:9.1f} {mem} {mfu}')
    if 'timm' in impls:
        for mode in modes:
            o, t = (next(r for r in results if r['impl'] == i and r['mode'] == mode) for i in ('ours', 'timm'))
            print(f'speed-up over timm ({mode}): {t["ms"] / o["ms"]:.2f}x')
    if args.json:
        write_atomically(args.json, json.dumps(results, indent=2).encode())
    return results


if __name__ == '__main__':
    main()
