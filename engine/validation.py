"""What the validators share: settings taken from the checkpoint's training run unless the command
line gives them, and the results file (checked before any work, written atomically)."""
import csv
import io
import json
import logging
import math
import os

from utils.cli import UsageError
from .files import check_writable_folder, write_atomically

_logger = logging.getLogger(__name__)


def settings_from_training(given: dict, trained: dict, source, defaults=None):
    """{name: value}: the command line's value (`given`, None where it gives none), else the
    training run's (`trained`), else `defaults`; says which were taken from the checkpoint and which
    the command line overrides."""
    defaults = defaults or {}
    settings, taken, overridden = {}, [], []
    for name, value in given.items():
        recorded = trained.get(name)
        recorded = list(recorded) if isinstance(recorded, tuple) else recorded
        value = list(value) if isinstance(value, tuple) else value
        if value is None and recorded is not None:
            taken.append(f'{name}={recorded}')
            value = recorded
        elif value is not None and recorded is not None and value != recorded:
            overridden.append(f'--{name.replace("_", "-")} {value} (trained with {recorded})')
        settings[name] = defaults.get(name) if value is None else value
    if taken:
        _logger.info('%s: %s from the checkpoint (the command line overrides them)', source, ', '.join(taken))
    if overridden:
        _logger.info('%s: the command line overrides the checkpoint: %s', source, '; '.join(overridden))
    return settings


def check_results_file(path, suffixes=('.json',), option='--results-file'):
    """Before any work: the name has one of `suffixes`, it is not a folder, and its folder exists
    and takes a file."""
    if not path:
        return
    if not path.endswith(tuple(suffixes)):
        raise UsageError(f'{option} {path}: use a {" or ".join(suffixes)} name')
    if os.path.isdir(path):
        raise UsageError(f'{option} {path}: it is a folder; name a file')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f'{option} {path}: folder {folder} does not exist')
    check_writable_folder(folder, option, named=path)


def check_outputs(reads, writes):
    """Before any work, that no output writes over what the command reads, nor over another output.
    `reads`: (what, path) of each file the command reads (a checkpoint, an annotation file, each
    image); `writes`: (option, path, names): a file output (names None), or a folder output and the
    file names it will write in it. A clash is a UsageError naming both."""
    owner = {}
    for option, path, names in writes:
        if not path:
            continue
        for target in ([path] if names is None else [os.path.join(path, name) for name in names]):
            key = os.path.realpath(target)
            if key in owner and owner[key][0] != option:
                other, other_path = owner[key]
                raise UsageError(f'{option} {path} and {other} {other_path} would both write {target}: give them '
                                 f'different paths')
            owner.setdefault(key, (option, path))
    for what, path in reads:
        written = owner.get(os.path.realpath(path)) if path else None
        if written is not None:
            option, given = written
            raise UsageError(f'{option} {given} would write over {what} {path}: outputs never replace inputs; choose '
                             f'another path')


def _json_safe(value):
    """NaN (e.g. a class absent from labels and predictions) as null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(path, rows):
    """One dict (or a list of them) as JSON, or rows as CSV, by the file's name; atomically."""
    if path.endswith('.json'):
        text = json.dumps(_json_safe(rows), indent=2)
    else:
        rows = rows if isinstance(rows, list) else [rows]
        buffer = io.StringIO()
        fields = list(dict.fromkeys(key for row in rows for key in row))  # rows may differ (a row's top-k is shorter)
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    write_atomically(path, text.encode())
    _logger.info('results written to %s', path)
