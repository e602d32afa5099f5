"""The several-nodes command of docs/training.md, for real: two torchrun launches on this machine as
two nodes (one gloo process each, c10d rendezvous), then the same two with --resume auto. Each epoch
the two ranks' shares of the training set partition it (computed here with main.py's sampler, and
checked against what the run logged), and the second launch continues the first run."""
import csv
import glob
import json
import os
import re
import socket
import subprocess
import sys

import torch.distributed

from data.dataset import ImageFolderDataset
from data.loader import EpochSampler
from tests.training_runs import FAST_D1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 6  # the shapes set's 24 training images: 12 per node, 2 full batches each
RANK_LINE = re.compile(r'Rank (\d): epoch (\d+), (\d+) training samples, first (\[[\d, ]*\])')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_nodes(data, output, *extra):
    """docs/training.md's command on two 'nodes' of this machine; returns their combined output."""
    endpoint = f'127.0.0.1:{_free_port()}'
    command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1',
               '--rdzv-backend', 'c10d', '--rdzv-endpoint', endpoint, '--rdzv-id', 'nodes-test',
               os.path.join(REPO, 'main.py'), data, *FAST_D1, '-b', str(BATCH), '--output', str(output), *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    return '\n'.join(logs)


def _shares(train_size, epoch, monkeypatch):
    """Each rank's indices of `epoch` as main.py's sampler gives them in a run of two processes
    (seed 42, the default), computed here: the process group's size and rank are all it asks for."""
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, 'get_world_size', lambda group=None: 2)
        monkeypatch.setattr(torch.distributed, 'get_rank', lambda group=None, rank=rank: rank)
        sampler = EpochSampler(range(train_size), BATCH, distributed=True, seed=42)
        sampler.set_epoch(epoch)
        shares[rank] = sampler.epoch_indices()
    monkeypatch.undo()
    return shares


def _check_epoch(log, epoch, train_size, monkeypatch):
    shares = _shares(train_size, epoch, monkeypatch)
    assert sorted(shares[0] + shares[1]) == list(range(train_size))  # every image once across the nodes
    logged = {int(rank): (int(count), json.loads(first)) for rank, e, count, first in RANK_LINE.findall(log)
              if int(e) == epoch}
    assert logged == {rank: (len(share), share[:6]) for rank, share in shares.items()}


def test_two_nodes_train_every_image_once_and_resume(shapes, tmp_path, monkeypatch):
    train_size = len(ImageFolderDataset(os.path.join(shapes, 'train')))
    log = _two_nodes(shapes, tmp_path, '--epochs', '1')
    assert 'Process 1 of 2 on cpu' in log
    _check_epoch(log, 0, train_size, monkeypatch)
    runs = glob.glob(str(tmp_path / 'train' / '*'))
    assert len(runs) == 1

    log = _two_nodes(shapes, tmp_path, '--epochs', '2', '--resume', 'auto')
    assert f'--resume auto: {runs[0]}/last.pth.tar' in log and 'continuing at epoch 1' in log
    _check_epoch(log, 1, train_size, monkeypatch)
    assert 'Rank 0: epoch 0' not in log
    assert glob.glob(str(tmp_path / 'train' / '*')) == runs
    with open(os.path.join(runs[0], 'summary.csv')) as f:
        assert [row['epoch'] for row in csv.DictReader(f)] == ['0', '1']
