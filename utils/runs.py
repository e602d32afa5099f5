"""Finding the run and checkpoint that `--resume auto` continues, and one writer per run directory."""
import glob
import logging
import os
from typing import NamedTuple, Optional

import yaml

from .checkpoint import CheckpointError, safe_load
from .checkpoint_saver import PARTIAL

_logger = logging.getLogger(__name__)

# arguments that only extend or re-host a run: a resumed command may change them
EXTENDS_RUN = frozenset({'resume', 'epochs', 'start_epoch', 'output', 'workers', 'log_interval', 'device',
                         'local_rank', 'pin_mem', 'recovery_interval', 'checkpoint_hist', 'no_resume_opt', 'config',
                         'validation_batch_size_multiplier', 'log_wandb', 'wandb_project', 'wandb_tags',
                         'wandb_resume_id', 'log_tensorboard'})
# arguments the script resolves when the command line leaves them out (the run records the value)
RESOLVED = frozenset({'num_classes', 'img_size'})
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
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or 'epoch' not in checkpoint:
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


def differences(saved: dict, current: dict, extends=EXTENDS_RUN):
    """['key: run X, command Y', ...] for the arguments that make a run another experiment."""
    found = []
    for key in sorted(set(saved) | set(current)):
        if key in extends:
            continue
        ours, theirs = current.get(key), saved.get(key)
        if key in RESOLVED and ours is None:
            continue
        if isinstance(ours, tuple):
            ours = list(ours)
        if ours != theirs:
            found.append(f'{key}: run {theirs!r}, command {ours!r}')
    return found


def find_resume_checkpoint(output_root, current_args: dict, kind='train', extends=EXTENDS_RUN) -> Optional[Found]:
    """The newest complete checkpoint of the newest run under output_root/<kind>/ whose recorded
    arguments match the command's (those in `extends` may differ); None when no run has a
    checkpoint to resume; ResumeError when runs exist but none matches."""
    runs = [d for d in glob.glob(os.path.join(output_root, kind, '*')) if os.path.isdir(d)]
    mismatched = []
    for run_dir in sorted(runs, key=os.path.getmtime, reverse=True):
        files = checkpoint_files(run_dir)
        if not files:
            continue
        saved = read_run_args(run_dir)
        diff = ['args.yaml missing or unreadable'] if saved is None else differences(saved, current_args, extends)
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
