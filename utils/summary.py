"""summary.csv of a training run: one row per epoch, every write atomic."""
import csv
import io
import os


def read_summary(path):
    """The rows of a summary file (dicts of strings); [] when it does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return [row for row in csv.DictReader(f) if row.get('epoch', '').strip()]


def _write_rows(path, rows):
    fieldnames = []
    for row in rows:
        fieldnames += [k for k in row if k not in fieldnames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval='')
    writer.writeheader()
    writer.writerows(rows)
    staging = path + '.partial'
    with open(staging, 'w', newline='') as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def append_summary(path, row):
    """Add an epoch's row (replacing an earlier row of the same epoch)."""
    rows = [r for r in read_summary(path) if str(r['epoch']) != str(row['epoch'])]
    _write_rows(path, rows + [{k: v for k, v in row.items()}])


def truncate_summary(path, start_epoch):
    """Drop the rows of epochs that a resumed run trains again."""
    if os.path.isfile(path):
        _write_rows(path, [r for r in read_summary(path) if int(r['epoch']) < start_epoch])
