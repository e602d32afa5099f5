"""summary.csv of a training run: one row per epoch (or evaluation interval), every write atomic
(a temporary file moved into place), so a kill never leaves a partial line. Checkpoints hold the rows too (engine/
checkpoint_saver.py): a resumed run rewrites summary.csv from them."""
import csv
import io
import logging
import os

from .files import write_atomically

_logger = logging.getLogger(__name__)


def read_summary(path):
    """The rows of a summary file (dicts of strings); blank and malformed lines (a partial last
    line, for instance) are left out with a warning; [] when it does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        reader = csv.DictReader(line for line in f if line.strip())
        rows, bad = [], 0
        for row in reader:
            try:
                step_of(row)
                complete = None not in row.values() and None not in row
            except (KeyError, TypeError, ValueError):
                complete = False
            if complete:
                rows.append(row)
            else:
                bad += 1
    if bad:
        _logger.warning('%s: left out %d malformed line(s)', path, bad)
    return rows


def write_summary(path, rows):
    """Write all rows (dicts; columns in order of first appearance) atomically."""
    fieldnames = []
    for row in rows:
        fieldnames += [k for k in row if k not in fieldnames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval='')
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue().encode())


def step_of(row):
    """The epoch (or iteration) of a summary row."""
    return int(row['epoch'] if 'epoch' in row else row['iteration'])


def truncate_summary(path, start_epoch):
    """Drop the rows of epochs (iterations) that a resumed run trains again."""
    if os.path.isfile(path):
        write_summary(path, [r for r in read_summary(path) if step_of(r) < start_epoch])
