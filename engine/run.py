"""A training run on disk, the same for every trainer: what `--resume` continues, the run
directory (lock, train.log from the first line, args.yaml, stale files), atomic checkpoints that
hold the summary rows, summary.csv, experiment tracking, and evaluation that never loses trained
work. Only the first process writes; on the others every method is a no-op.
"""
import argparse
import glob
import json
import logging
import os
from typing import NamedTuple, Optional

import torch.distributed as dist
import yaml
from timm.utils import get_outdir

from utils.checkpoint import CheckpointError, resolve_checkpoint_path, resume_checkpoint, safe_load, training_step
from utils.cli import NonFiniteLoss, UsageError, run_cli
from utils.log import log_to_file
from .checkpoint_saver import CheckpointSaver
from .files import PARTIAL, DiskFullError, write_atomically
from .options import option_defaults, renamed_options, resolved_options, run_extending
from .runs import (ResumeError, RunLock, find_resume_checkpoint, newest_complete_checkpoint, promote,
                   remove_abandoned_partials)
from .summary import read_summary, truncate_summary, write_summary
from .tracking import Tracker, check_tracking

_logger = logging.getLogger(__name__)


class Resume(NamedTuple):
    path: str          # the checkpoint file
    checkpoint: dict   # its contents, read once


def find_resume(args, parser, kind, upgrade=None) -> Optional[Resume]:
    """What `--resume` names: 'auto', the newest complete checkpoint of the newest run under
    <--output>/<kind>/ started with the same arguments (those the parser marks with extends_run may
    differ; `upgrade` renames the arguments of runs recorded under older option names); a run
    directory, its newest complete checkpoint (the run continues where it stopped, whichever epoch
    was its best); a file, that checkpoint; '' nothing. Checks the tracking packages too, so that a
    missing one is said before any work."""
    check_tracking(args)
    if args.resume == 'auto':
        renamed = renamed_options(parser)

        def recorded_now(saved):  # a run recorded under older option names, in today's
            saved = {renamed.get(key, key): value for key, value in saved.items()}
            return upgrade(saved) if upgrade is not None else saved

        found = find_resume_checkpoint(args.output, vars(args), kind=kind, extends=run_extending(parser),
                                       defaults=option_defaults(parser), resolved=resolved_options(parser),
                                       upgrade=recorded_now)
        if found is None:
            _logger.info('--resume auto: no run with a checkpoint under %s, starting fresh', args.output)
            return None
        path = promote(found.path)
        unit = 'iteration' if 'iteration' in found.checkpoint else 'epoch'
        _logger.info('--resume auto: %s (the newest complete checkpoint of %s, %s %d)', path, found.run_dir, unit,
                     training_step(found.checkpoint))
        return Resume(path, found.checkpoint)
    if args.resume and os.path.isdir(args.resume):  # a run directory: its newest complete state, not its best
        found = newest_complete_checkpoint(args.resume)
        if found is None:
            raise CheckpointError(f'--resume {args.resume}: the folder holds no complete training checkpoint')
        path = promote(found.path)
        _logger.info('--resume %s: %s (its newest complete checkpoint, %s %d)', args.resume, path,
                     'iteration' if 'iteration' in found.checkpoint else 'epoch', training_step(found.checkpoint))
        return Resume(path, found.checkpoint)
    if args.resume:
        path = resolve_checkpoint_path(args.resume)
        return Resume(path, safe_load(path))
    return None


def resume_training(model, resume: Resume, optimizer, runtime, total, unit, option):
    """Model, optimizer and loss scaler restored from `resume`; returns the `unit` ('epoch' or
    'iteration') to continue at. A run already at `total` is a UsageError naming `option`."""
    start = resume_checkpoint(model, resume.path, optimizer=optimizer, loss_scaler=runtime.amp.loss_scaler,
                              checkpoint=resume.checkpoint)
    if unit == 'iteration':  # iterations done (segmentation checkpoints from before 'iteration' say 'epoch')
        start = training_step(resume.checkpoint)
    _logger.info('Resumed %s: continuing at %s %d', resume.path, unit, start)
    if start >= total:
        complete_summary(resume, runtime)
        raise UsageError(f'nothing to train: the run is at {unit} {start} of {option} {total}; raise {option} to '
                         f'continue it')
    return start


def complete_summary(resume: Optional[Resume], runtime):
    """summary.csv of the resumed run rewritten from its checkpoint's rows when it lacks some (the
    process was killed between writing the checkpoint and the summary). A run resumed to train on
    does this when its run directory opens; this is for one with nothing left to train."""
    if resume is None or not runtime.is_main:
        return
    run_dir = os.path.dirname(resume.path)
    rows = (resume.checkpoint.get('saver') or {}).get('summary') or []
    path = os.path.join(run_dir, 'summary.csv')
    if not rows or not os.path.isfile(os.path.join(run_dir, 'args.yaml')) or len(read_summary(path)) >= len(rows):
        return
    try:
        lock = RunLock(run_dir)
    except ResumeError:
        return  # another process is writing the run
    try:
        write_summary(path, rows)
        _logger.info('%s: the rows of %s completed from its checkpoint', path, resume.path)
    finally:
        lock.release()


class RunDirectory:
    """The run's folder: the resumed run's own when it has one, else a new
    <output>/<kind>/<name> (name: time-model-...). Opening it takes the run's lock, starts train.log
    (with everything logged since the process started), removes stale temporary files, restores the
    checkpoint history and rebuilds summary.csv up to `completed` (the last step the resumed
    checkpoint completed), and records the arguments in args.yaml.

    `step_name`: 'epoch' or 'iteration', the unit of the checkpoints and summary rows."""

    def __init__(self, args, runtime, kind, name_parts, model, optimizer, resume: Optional[Resume] = None,
                 completed=None, model_ema=None, step_name='epoch', decreasing=False, max_history=10, extra=None):
        self.path, self.saver, self.tracker, self.summary_path = '', None, None, ''
        self.step_name = step_name
        if not runtime.is_main:
            return
        resume_dir = os.path.dirname(resume.path) if resume else None
        if resume_dir and os.path.isfile(os.path.join(resume_dir, 'args.yaml')):
            self.path = resume_dir
        else:
            self.path = get_outdir(args.output, kind, '-'.join(map(str, name_parts)), inc=True)
        self.lock = RunLock(self.path)
        log_to_file(os.path.join(self.path, 'train.log'))
        for stale in glob.glob(os.path.join(self.path, '*' + PARTIAL)):  # complete ones were promoted on resume
            os.remove(stale)
        remove_abandoned_partials(args.output, kind)
        self.saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(**vars(args)),
                                     checkpoint_dir=self.path, model_ema=model_ema, amp_scaler=runtime.amp.loss_scaler,
                                     decreasing=decreasing, max_history=max_history, extra=extra,
                                     step_name=step_name)
        self.summary_path = os.path.join(self.path, 'summary.csv')
        if resume and self.path == resume_dir:
            self.saver.restore(resume.checkpoint)
            if self.saver.summary_rows:  # the checkpoint's rows are the record: summary.csv is rebuilt from them
                write_summary(self.summary_path, [r for r in self.saver.summary_rows
                                                  if int(r[step_name]) <= completed])
            else:
                truncate_summary(self.summary_path, completed + 1)
        write_atomically(os.path.join(self.path, 'args.yaml'),
                         yaml.safe_dump(vars(args), default_flow_style=False).encode())
        self.tracker = Tracker(args, self.path, vars(args), step_name=step_name)

    @property
    def best(self):
        """(best metric, its step), or (None, None)."""
        return (self.saver.best_metric, self.saver.best_epoch) if self.saver else (None, None)

    def log_step(self, step, metrics):
        if self.tracker is not None:
            self.tracker.log_step(step, metrics)

    def save(self, step, row, metric=None):
        """Checkpoints of `step` (holding the summary rows, `row` included), then summary.csv, then
        the trackers; returns (best metric, its step)."""
        if self.saver is None:
            return None, None
        best = self.saver.save_checkpoint(step, metric=metric, summary_row=row)
        write_summary(self.summary_path, self.saver.summary_rows)
        self.tracker.log_summary(step, row)
        return best

    def evaluate(self, step, evaluate, row):
        """evaluate() (on every process); when it fails, the trained state of `step` is saved first
        (last.pth.tar, with `row`) so that `--resume auto` continues from it, then the error goes on."""
        try:
            return evaluate()
        except Exception:
            if self.saver is not None:
                self.saver.save_checkpoint(step, summary_row=row)
                write_summary(self.summary_path, self.saver.summary_rows)
                _logger.error('the evaluation at %s %d failed: the trained state is saved in %s; fix the cause and '
                              'continue with --resume auto', self.step_name, step,
                              os.path.join(self.path, 'last.pth.tar'))
            raise

    def close(self, metric_name='metric', best_key=None):
        """The end of training: the best `metric_name` said (and, with `best_key`, written to
        best.json as {best_key: value, step name: step}), trackers closed, the process group (when
        there is one) left; returns the run directory."""
        best, step = self.best
        if best is not None:
            _logger.info('*** Best %s: %s (%s %s)', metric_name, best, self.step_name, step)
            if best_key:
                write_atomically(os.path.join(self.path, 'best.json'),
                                 json.dumps({best_key: best, self.step_name: step}).encode())
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return self.path


def newest_run(output, kind):
    """The run directory under <output>/<kind>/ written last (the one a trainer just made or resumed)."""
    runs = [d for d in glob.glob(os.path.join(output, kind, '*')) if os.path.isdir(d)]
    if not runs:
        raise ResumeError(f'no run under {os.path.join(output, kind)}')
    return max(runs, key=os.path.getmtime)  # every file a run writes is moved into its folder: its mtime


def run_trainer(main, argv, logger, errors=()):
    """A trainer's (or a demo's) command line: main(argv), returned; the expected errors (the
    engine's and `errors`) in one line with exit code 2, Ctrl-C with 130 (utils/cli.py)."""
    return run_cli(main, argv, (UsageError, CheckpointError, NonFiniteLoss, ResumeError, DiskFullError, *errors), logger,
            'interrupted: the checkpoints written so far are kept; continue with --resume auto')
