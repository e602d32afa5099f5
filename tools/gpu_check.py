#!/usr/bin/env python3
"""Everything this repository checks only on a GPU, in one command and one report.

    python -m tools.gpu_check                      # writes gpu_check.md
    python -m tools.gpu_check --out h100.md

Runs the GPU tests (`pytest -m gpu`: the fused kernels in fp32/bf16/fp16, torch.compile of VOLO-D1,
mixed-precision training steps, SyncBatchNorm, NCCL and DDP, the step's host reads, cuDNN/TF32
settings) with the kernels compiled (TRITON_INTERPRET=0), then the GPU benchmarks of
docs/performance.md through tools/benchmark.py (bf16, batch 128, 224 px): VOLO-D1 training
images/s against timm's eager and compiled, with the PyTorch outlook path, inference images/s,
peak memory, MFU, and the fused op against timm's unfold/fold. Each step runs in a process of its
own with a timeout, all within --budget seconds (sized for under 8 minutes on one H100). The
report names the card and the torch, timm and triton versions, and holds the tests' summary and a
table of the figures. Exit code 0: every test passed and every benchmark ran; 1: the report says
what failed; 2: no CUDA device (one line) or an --out that cannot be written.
"""
import argparse
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import NamedTuple, Optional

import timm
import torch

from engine.files import DiskFullError, check_writable_folder, write_atomically
from utils.cli import PartialFailure, UsageError, run_cli

_logger = logging.getLogger('gpu_check')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLE = '# GPU check'
TESTS = ['-m', 'pytest', '-m', 'gpu', '-q', '-rfEs', '-p', 'no:cacheprovider']
MODEL = ['--model', 'volo_d1', '--img-size', '224', '-b', '128', '--device', 'cuda', '--precision', 'bf16',
         '--warmup', '3', '--iters', '10']
# (what, tools.benchmark options, timeout in seconds), in the order they run: the cheap figures before the
# compiled one, the PyTorch outlook path last; a step the budget cannot hold any more is cut
BENCHMARKS = [
    ('VOLO-D1 training, eager', MODEL + ['--mode', 'train', '--compare-timm'], 150),
    ('outlook attention, d1 stage 1', ['--op', 'outlook_attention', '--img-size', '224', '-b', '128', '--device',
                                       'cuda', '--precision', 'bf16', '--warmup', '3', '--iters', '20',
                                       '--compare-timm'], 90),
    ('VOLO-D1 inference', MODEL + ['--mode', 'infer', '--compare-timm'], 90),
    ('VOLO-D1 training, torch.compile', MODEL + ['--mode', 'train', '--compare-timm', '--compile'], 300),
    ('VOLO-D1 training, PyTorch outlook path', MODEL + ['--mode', 'train', '--outlook-impl', 'torch'], 120),
]
TESTS_TIMEOUT = 240


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='gpu_check.md', help='the report (Markdown); an earlier report is replaced, '
                                                         'any other file is left alone')
    p.add_argument('--budget', type=float, default=460.,
                   help='seconds for the tests and the benchmarks together; a step that would run past it is cut')
    return p.parse_args(argv)


class Finished(NamedTuple):
    code: Optional[int]  # None: stopped at its timeout
    output: str          # stdout and stderr together
    seconds: float


def run_command(command, timeout):
    """`command` (arguments after the Python interpreter) from the repository root with the fused
    kernels compiled, not interpreted; its whole process group is killed at `timeout` seconds."""
    env = dict(os.environ, TRITON_INTERPRET='0')
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return Finished(code, output, time.perf_counter() - start)


def describe_card():
    props = torch.cuda.get_device_properties(0)
    return (f'{torch.cuda.get_device_name(0)} (sm_{props.major}{props.minor}, '
            f'{props.total_memory / 2 ** 30:.1f} GiB)')


def versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'not installed'
    return (f'torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, '
            f'triton {triton_version}, Python {platform.python_version()}')


def check_out(path):
    """--out: a new file, or an earlier report of this tool (never one of its inputs or another
    file), in a folder this process can write."""
    if os.path.isfile(path):
        with open(path, encoding='utf-8', errors='replace') as f:
            if f.readline().rstrip('\n') != TITLE:
                raise UsageError(f'--out {path}: the file exists and is not a report of tools.gpu_check; '
                                 f'not overwriting it')
    check_writable_folder(os.path.dirname(os.path.abspath(path)), '--out', named=path)


def summarise_tests(output):
    """(pytest's last summary line, its FAILED / ERROR / SKIPPED lines)."""
    lines = [line.strip('= ') for line in output.splitlines()]
    summary = next((line for line in reversed(lines)
                    if re.search(r'\d+ (passed|failed|skipped|deselected|errors?)\b', line)), '')
    return summary, [line for line in lines if line.startswith(('FAILED', 'ERROR', 'SKIPPED'))]


def tail(output, lines=30):
    return '\n'.join(output.rstrip().splitlines()[-lines:])


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise UsageError(f'tools.gpu_check needs a CUDA device and torch {torch.__version__} finds none here')
    check_out(args.out)
    started, deadline = datetime.now(), time.monotonic() + args.budget

    def run(command, timeout):
        """run_command within what is left of the budget; None when too little is left to start."""
        left = deadline - time.monotonic()
        return run_command(command, min(timeout, left)) if left >= 10 else None

    command = ' '.join(['python -m tools.gpu_check', *(sys.argv[1:] if argv is None else argv)])
    lines = [TITLE, '', f'- card: {describe_card()}', f'- {versions()}',
             f'- run: {started:%Y-%m-%d %H:%M}, `{command}`', '']
    _logger.info('GPU tests: python %s', ' '.join(TESTS))
    tests_lines, tests_summary, tests_passed = tests_section(run(TESTS, TESTS_TIMEOUT))
    _logger.info('GPU tests: %s', tests_summary)
    results, problems = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for i, (what, options, timeout) in enumerate(BENCHMARKS):
            _logger.info('benchmark: %s', what)
            json_path = os.path.join(scratch, f'{i}.json')
            done = run(['-m', 'tools.benchmark', *options, '--json', json_path], timeout)
            if done is not None and done.code == 0 and os.path.exists(json_path):
                with open(json_path) as f:
                    results[what] = json.load(f)
            else:
                problems[what] = done
    lines += tests_lines + benchmark_section(results, problems)
    lines += [f'Finished in {(datetime.now() - started).total_seconds():.0f} s.', '']
    write_atomically(args.out, '\n'.join(lines).encode())
    _logger.info('wrote %s', args.out)
    failed = ([] if tests_passed else ['the GPU tests']) + [f'benchmark {what!r}' for what in problems]
    if failed:
        raise PartialFailure(f'{", ".join(failed)}: see {args.out}')
    return args.out


def tests_section(tests):
    """(the report's lines on the tests' run, its summary line, whether every test passed)."""
    lines = ['## Tests', '', f'`TRITON_INTERPRET=0 python {" ".join(TESTS)}`', '']
    if tests is None or tests.code is None:
        summary = 'stopped at the time limit'
        return lines + [f'**{summary}**', '', '```', tail(tests.output if tests else ''), '```', ''], summary, False
    summary, listed = summarise_tests(tests.output)
    summary = f'{summary or "no summary line"} (exit code {tests.code}, {tests.seconds:.0f} s)'
    if tests.code != 0 and not listed:
        listed = tail(tests.output).splitlines()
    return lines + [f'**{summary}**', *(['', '```', *listed, '```'] if listed else []), ''], summary, tests.code == 0


def benchmark_section(results, problems):
    """The report's table of the benchmarks that ran (each row of tools/benchmark.py's --json), their
    commands, and what became of the others."""
    lines = ['## Benchmarks', '',
             'tools/benchmark.py, bf16 autocast, 224 px: medians of alternating runs; peak memory of one step above '
             'the weights and optimizer state; MFU: the matmul and convolution FLOPs over the time over the dense '
             'bf16 peak.', '',
             '| benchmark | implementation | mode | batch | ms/step | images/s | peak MiB | MFU | speed-up over timm |',
             '|---|---|---|---|---|---|---|---|---|']
    for what, rows in results.items():
        for r in rows:
            timm_row = next((t for t in rows if t['impl'] == 'timm' and t['mode'] == r['mode']), None)
            speedup = f'{timm_row["ms"] / r["ms"]:.2f}x' if r['impl'] == 'ours' and timm_row else ''
            mem = f'{r["peak_mib"]:,.0f}' if 'peak_mib' in r else '-'
            mfu = f'{100 * r["mfu"]:.1f}%' if 'mfu' in r else '-'
            lines.append(f'| {what} | {"this repo" if r["impl"] == "ours" else "timm"} | {r["mode"]} | {r["batch"]} | '
                         f'{r["ms"]:.1f} | {r["images_per_s"]:,.1f} | {mem} | {mfu} | {speedup} |')
    lines += ['', '```bash', *(f'python -m tools.benchmark {" ".join(options)}' for _, options, _ in BENCHMARKS),
              '```', '']
    for what, done in problems.items():
        why = ('not run: the time budget was spent' if done is None else
               f'stopped at its timeout ({done.seconds:.0f} s)' if done.code is None else
               f'exit code {done.code}')
        lines += [f'**{what}: {why}.**', '']
        if done is not None:
            lines += ['```', tail(done.output), '```', '']
    return lines


def cli(argv=None):
    from utils.log import setup_logging
    setup_logging()
    run_cli(main, argv, (UsageError, DiskFullError), _logger)


if __name__ == '__main__':
    cli()
