"""Runs a trainer with rank 1's loss turned NaN at its second step, for the test that every rank
then stops together (tests/test_engine.py):

    torchrun --nproc_per_node 2 tests/nan_on_one_rank.py main.py|train_seg.py ARGS...

The training losses' forward is wrapped before the script starts; nothing else changes."""
import os
import runpy
import sys

from loss import SegmentationLoss, TokenLabelCrossEntropy

RANK = int(os.environ.get('RANK', 0))


def poison_second_call(cls):
    forward = cls.forward
    calls = [0]

    def wrapped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls[0] += 1
        if RANK == 1 and calls[0] == 2:
            out = (out[0] * float('nan'), *out[1:]) if isinstance(out, tuple) else out * float('nan')
        return out

    cls.forward = wrapped


for loss_class in (TokenLabelCrossEntropy, SegmentationLoss):
    poison_second_call(loss_class)
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name='__main__')
