"""Processes forked from the test process, with the modules it has already imported: a fresh
interpreter costs about 10 s of CPU here, mostly importing torch and timm. run_ranks is for the
tests of what several processes do together (sharding, gathering, stopping together): each rank
gets what torchrun gives a process (RANK, LOCAL_RANK, WORLD_SIZE and an env:// rendezvous on this
machine) and runs a script's own cli(). run_forked is for what must not outlive its process (an
audit hook). distributed_train.sh and torchrun themselves are run for real by tests/test_training.py."""
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
    rank (see run_forked)."""
    port = free_port()

    def rank_target(rank):
        def run():
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                              LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
            target()
        return run

    return run_forked([rank_target(rank) for rank in range(world_size)], log_dir, timeout)


def run_forked(targets, log_dir, timeout=300):
    """Each of `targets` called in a process forked from this one, all at once; returns
    [(exit code, output)] in their order, where output is that process's stdout and stderr
    together. A SystemExit is its exit code, any other exception is printed and exits 1; a process
    killed by a signal has minus its number. Processes still running after `timeout` seconds are
    killed and reported."""
    os.makedirs(log_dir, exist_ok=True)
    logs = [os.path.join(log_dir, f'process{i}.log') for i in range(len(targets))]
    pids = [start_forked(target, log) for target, log in zip(targets, logs)]
    results = []
    try:
        for pid, log in zip(pids, logs):
            results.append((wait_forked(pid, log, timeout), open(log).read()))
    finally:  # after a timeout: the ones not waited for yet too
        for pid in pids[len(results) + 1:]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return results


def start_forked(target, log):
    """The pid of a process forked from this one that calls target() and exits, its stdout and
    stderr written to the file `log` (see run_forked)."""
    open(log, 'w').close()  # there to read from the start
    pid = os.fork()
    if pid == 0:
        _run_child(target, log)
    return pid


def wait_forked(pid, log, timeout=300):
    """The exit code of start_forked's process `pid`; killed and reported (its `log`) when it runs
    past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f'process still running after {timeout} s:\n' + open(log).read()[-3000:])
        time.sleep(0.05)


def _run_child(target, log):
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = sys.stderr = open(1, 'w', buffering=1, closefd=False)  # not pytest's capture
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
