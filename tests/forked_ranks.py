"""Ranks of a process group forked from the test process, for the tests of what several processes
do together (sharding, gathering, stopping together). Each rank gets what torchrun gives a process
(RANK, LOCAL_RANK, WORLD_SIZE and an env:// rendezvous on this machine) and runs a script's own
cli(), with the modules the test process has already imported: a fresh interpreter per rank costs
about 10 s of CPU here, mostly importing torch and timm. distributed_train.sh and torchrun
themselves are run for real by tests/test_training.py."""
import os
import signal
import socket
import sys
import time
import traceback

import torch


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(target, log_dir, world_size=2, timeout=300):
    """target() in `world_size` forked processes, one per rank; returns [(exit code, output)] by
    rank, where output is that process's stdout and stderr together. A SystemExit from target is
    its exit code, any other exception is printed and exits 1. Ranks still running after `timeout`
    seconds are killed and reported."""
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    logs = [os.path.join(log_dir, f'rank{rank}.log') for rank in range(world_size)]
    pids = []
    for rank, log in enumerate(logs):
        pid = os.fork()
        if pid == 0:
            _run_rank(target, rank, world_size, port, log)
        pids.append(pid)
    codes = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if len(codes) < len(pids) and time.monotonic() > deadline:
            for pid in set(pids) - set(codes):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise AssertionError(f'ranks still running after {timeout} s:\n' +
                                 '\n'.join(open(log).read()[-3000:] for log in logs))
        time.sleep(0.05)
    return [(codes[pid], open(log).read()) for pid, log in zip(pids, logs)]


def _run_rank(target, rank, world_size, port, log):
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = sys.stderr = open(1, 'w', buffering=1, closefd=False)  # not pytest's capture
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 under torchrun on 2 cores
        try:
            target()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)
