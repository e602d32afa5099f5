"""Finding the run and checkpoint that `--resume auto` continues, and one writer per run directory."""
import glob
import logging
import os
from typing import NamedTuple, Optional

import yaml

from utils.checkpoint import CheckpointError, safe_load, training_step
from .files import PARTIAL

_logger = logging.getLogger(__name__)

LOCK_NAME = '.lock'


class ResumeError(RuntimeError):
    """No run under --output matches the command, or its run directory is busy."""


class Found(NamedTuple):
    run_dir: str
    path: str          # the checkpoint file (a complete one)
    checkpoint: dict   # its contents, already read


def checkpoint_files(run_dir):
    """Checkpoint files of a run directory, newest first: last, checkpoint-N, recovery-E-S, and
    files still under their temporary name (complete if the writer died just before renaming)."""
    names = glob.glob(os.path.join(run_dir, '*.pth.tar')) + glob.glob(os.path.join(run_dir, '*.pth.tar' + PARTIAL))
    return sorted(names, key=lambda p: (os.path.getmtime(p), 'last.pth.tar' in os.path.basename(p)), reverse=True)


def read_complete(path) -> Optional[dict]:
    """A training checkpoint's contents, or None when it is incomplete or not a training checkpoint."""
    try:
        checkpoint = safe_load(path)
    except CheckpointError as e:
        _logger.warning('skipping %s: %s', path, e)
        return None
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or training_step(checkpoint) is None:
        return None
    return checkpoint


def promote(path):
    """A complete checkpoint still under its temporary name takes its final name (with the other
    names the writer was giving the same file); returns the final path."""
    if not path.endswith(PARTIAL):
        return path
    for other in glob.glob(os.path.join(os.path.dirname(path), '*' + PARTIAL)):
        if other != path and os.path.samefile(other, path):
            os.replace(other, other[:-len(PARTIAL)])
    final = path[:-len(PARTIAL)]
    os.replace(path, final)
    return final


def newest_complete_checkpoint(run_dir) -> Optional[Found]:
    for path in checkpoint_files(run_dir):
        checkpoint = read_complete(path)
        if checkpoint is not None:
            return Found(run_dir, path, checkpoint)
    return None


def read_run_args(run_dir):
    try:
        with open(os.path.join(run_dir, 'args.yaml')) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def differences(saved: dict, current: dict, extends=frozenset(), defaults=None, resolved=frozenset()):
    """['key: run X, command Y', ...] for the arguments that make a run another experiment. Those in
    `extends` may differ; those in `resolved` are filled in by the script when the command leaves
    them out; an argument the run does not record (added since) matches at its default, and a value
    the run records that no option of the command has (one the script derived) is not compared."""
    defaults = defaults or {}
    found = []
    for key in sorted(set(saved) | set(current)):
        if key in extends:
            continue
        if key not in current and key not in defaults:
            continue  # recorded, but no option of today's command: a value the script derived
        ours, theirs = current.get(key), saved.get(key)
        if key in resolved and ours is None:
            continue
        if isinstance(ours, tuple):
            ours = list(ours)
        if key not in saved and key in defaults:
            default = defaults[key]
            theirs = list(default) if isinstance(default, tuple) else default
        if ours != theirs:
            found.append(f'{key}: run {theirs!r}, command {ours!r}')
    return found


def find_resume_checkpoint(output_root, current_args: dict, kind='train', extends=frozenset(), defaults=None,
                           resolved=frozenset(), upgrade=None) -> Optional[Found]:
    """The newest complete checkpoint of the newest run under output_root/<kind>/ whose recorded
    arguments match the command's (see `differences`; `upgrade(saved)` first brings the arguments
    of a run recorded under older option names up to date); None when no run has a checkpoint to
    resume; ResumeError when runs exist but none matches."""
    runs = [d for d in glob.glob(os.path.join(output_root, kind, '*')) if os.path.isdir(d)]
    mismatched = []
    for run_dir in sorted(runs, key=os.path.getmtime, reverse=True):
        files = checkpoint_files(run_dir)
        if not files:
            continue
        saved = read_run_args(run_dir)
        if saved is not None and upgrade is not None:
            saved = upgrade(saved)
        diff = ['args.yaml missing or unreadable'] if saved is None else differences(saved, current_args, extends,
                                                                                      defaults, resolved)
        if diff:
            mismatched.append((run_dir, diff))
            continue
        found = newest_complete_checkpoint(run_dir)
        if found is not None:
            return found
    if mismatched:
        listing = '\n'.join(f'  {run}: ' + '; '.join(diff[:4]) + (f' (+{len(diff) - 4} more)' if len(diff) > 4 else '')
                            for run, diff in mismatched[:5])
        raise ResumeError(f'--resume auto: no run under {output_root} was started with these arguments; '
                          f'the runs with checkpoints differ:\n{listing}\nPass --resume FILE to continue one of '
                          f'them anyway, or another --output to start fresh.')
    return None


def remove_abandoned_partials(output_root, kind):
    """Temporary files of runs under output_root/<kind>/ that no process is writing (their lock can
    be taken): a run killed before its first complete checkpoint is never resumed, so its partial
    file would otherwise stay forever. Returns the files removed."""
    removed = []
    for run_dir in glob.glob(os.path.join(output_root, kind, '*')):
        stale = glob.glob(os.path.join(run_dir, '*' + PARTIAL))
        if not stale:
            continue
        try:
            lock = RunLock(run_dir)
        except ResumeError:
            continue  # being written now
        try:
            for path in stale:
                os.remove(path)
                removed.append(path)
        finally:
            lock.release()
    if removed:
        _logger.info('removed %d temporary file(s) of interrupted runs: %s', len(removed), ', '.join(removed[:3]))
    return removed


class RunLock:
    """An exclusive lock on a run directory for the life of the process (released by the OS if it
    dies): a second training process writing the same run is refused."""

    def __init__(self, run_dir):
        import fcntl
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.file = open(self.path, 'a+')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or 'another process'
            self.file.close()
            raise ResumeError(f'{run_dir} is being written by {holder} (lock {self.path}); '
                              f'wait for it to finish or use another --output') from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'pid {os.getpid()}\n')
        self.file.flush()

    def release(self):
        self.file.close()
