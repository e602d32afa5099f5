"""Training checkpoints that are never lost or half written.

Every checkpoint is written once under a temporary name; each name it should appear under (last,
model_best, checkpoint-<epoch>) gets a hard link of it (a copy where links are not supported),
which is then moved into place with one `os.replace`. A crash at any moment leaves every name
either its previous complete file or the new complete one; nothing is unlinked first.
"""
import logging
import os
import shutil
from typing import List, Optional, Tuple

import torch
from timm.utils import unwrap_model

from .files import PARTIAL, DiskFullError, write_staged  # noqa: F401  (DiskFullError: the saver's error)

_logger = logging.getLogger(__name__)


def replace_with_copy_of(source: str, target: str):
    """Make `target` a complete copy (a hard link where possible) of `source`, atomically."""
    staging = target + PARTIAL
    if os.path.lexists(staging):
        os.remove(staging)
    try:
        os.link(source, staging)
    except OSError:
        shutil.copyfile(source, staging)
    os.replace(staging, target)


class CheckpointSaver:
    """last.pth.tar every epoch, model_best.pth.tar for the best metric, the `max_history` best
    checkpoint-<epoch>.pth.tar, and recovery-<epoch>-<step>.pth.tar on request. The checkpoints
    are dicts in the reference's layout (epoch, arch, state_dict, optimizer, version, args,
    amp_scaler, state_dict_ema, metric) plus `saver`, this object's history, restored on resume."""

    def __init__(self, model, optimizer, args, checkpoint_dir, model_ema=None, amp_scaler=None,
                 decreasing=False, max_history=10, extra=None, step_name='epoch'):
        self.model, self.optimizer, self.args = model, optimizer, args
        self.model_ema, self.amp_scaler = model_ema, amp_scaler
        self.checkpoint_dir = checkpoint_dir
        self.extra = dict(extra or {})  # saved in every checkpoint (e.g. class_names)
        self.decreasing = decreasing
        self.step_name = step_name  # 'epoch', or 'iteration' for trainers that count iterations
        self.max_history = max_history
        self.history: List[Tuple[str, float]] = []  # (file name, metric), best first
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.summary_rows: List[dict] = []  # summary.csv's rows, kept in every checkpoint to rebuild it

    def _better(self, a, b):
        return b is None or (a < b if self.decreasing else a > b)

    def restore(self, checkpoint: dict):
        """History and best metric from a resumed checkpoint (files that no longer exist dropped)."""
        state = checkpoint.get('saver') or {}
        self.history = [(name, float(metric)) for name, metric in state.get('history', [])
                        if os.path.isfile(os.path.join(self.checkpoint_dir, name))]
        self.best_metric, self.best_epoch = state.get('best_metric'), state.get('best_epoch')
        self.summary_rows = [self._upgraded(row) for row in state.get('summary', [])]

    def _upgraded(self, row):
        """A summary row as saved; rows of iteration runs written before they said `iteration` carry
        the step as `epoch`."""
        row = dict(row)
        if self.step_name not in row and 'epoch' in row:
            row = {self.step_name: row.pop('epoch'), **row}
        return row

    def _state(self, epoch, metric, history, best, summary_rows, mid_epoch=None):
        model = unwrap_model(self.model)
        state = {self.step_name: epoch, 'arch': type(model).__name__.lower(), 'state_dict': model.state_dict(),
                 'optimizer': self.optimizer.state_dict(), 'version': 2, 'args': self.args}
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = unwrap_model(self.model_ema).state_dict()
        if metric is not None:
            state['metric'] = float(metric)
        state.update(self.extra)
        state['saver'] = {'history': history, 'best_metric': best[0], 'best_epoch': best[1],
                          'summary': summary_rows}
        if mid_epoch is not None:
            state['mid_epoch'] = dict(mid_epoch)
        return state

    def _write(self, state, path):
        """torch.save under a temporary name (a Python file: a full disk raises OSError(ENOSPC));
        the caller moves it into place."""
        return write_staged(path, lambda f: torch.save(state, f),
                            f'the earlier checkpoints in {self.checkpoint_dir} are kept')

    def save_checkpoint(self, epoch: int, metric: Optional[float] = None, summary_row: Optional[dict] = None):
        """Write this epoch's checkpoints (holding the summary rows so far, this epoch's included);
        returns (best metric, best epoch)."""
        summary_rows = [r for r in self.summary_rows if int(r[self.step_name]) < epoch]
        if summary_row is not None:
            summary_rows.append(dict(summary_row))
        name = f'checkpoint-{epoch}.pth.tar'
        history = [(n, m) for n, m in self.history if n != name]
        keep = metric is not None and self.max_history > 0 and (
            len(history) < self.max_history or self._better(metric, history[-1][1]))
        if keep:
            history.append((name, float(metric)))
            history.sort(key=lambda item: item[1], reverse=not self.decreasing)
        dropped, history = history[self.max_history:], history[:self.max_history]
        best = (self.best_metric, self.best_epoch)
        new_best = metric is not None and self._better(metric, self.best_metric)
        if new_best:
            best = (float(metric), epoch)

        last = os.path.join(self.checkpoint_dir, 'last.pth.tar')
        staging = self._write(self._state(epoch, metric, history, best, summary_rows), last)
        if keep and any(n == name for n, _ in history):
            replace_with_copy_of(staging, os.path.join(self.checkpoint_dir, name))
        if new_best:
            replace_with_copy_of(staging, os.path.join(self.checkpoint_dir, 'model_best.pth.tar'))
        os.replace(staging, last)
        for old_name, _ in dropped:
            path = os.path.join(self.checkpoint_dir, old_name)
            if os.path.exists(path):
                os.remove(path)
        self.history, self.summary_rows = history, summary_rows
        self.best_metric, self.best_epoch = best
        if history:
            _logger.info('Kept checkpoints (%s): %s', 'lowest first' if self.decreasing else 'highest first',
                         ', '.join(f'{n} ({m:.4f})' for n, m in history))
        return self.best_metric, self.best_epoch

    def save_recovery(self, epoch: int, batch_idx: int = 0, mid_epoch: Optional[dict] = None):
        """A mid-epoch checkpoint; the previous recovery file is removed once this one is complete.
        `mid_epoch`: where in the epoch it was taken (batch, steps, loss_sum, seen): a resumed run
        continues the epoch from there."""
        path = os.path.join(self.checkpoint_dir, f'recovery-{epoch}-{batch_idx}.pth.tar')
        best = (self.best_metric, self.best_epoch)
        state = self._state(epoch, None, self.history, best, self.summary_rows, mid_epoch)
        os.replace(self._write(state, path), path)
        for name in os.listdir(self.checkpoint_dir):
            if name.startswith('recovery-') and name.endswith('.pth.tar') and name != os.path.basename(path):
                os.remove(os.path.join(self.checkpoint_dir, name))
        return path
