"""Every file the programs write goes through here: written under a temporary name, synced, then
moved into place, so a file is its previous complete contents or the new ones, never partial; a
full disk is said in one line naming the file (also where the writer hides ENOSPC: torch's zip
writer turns it into "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"); output
folders are checked before the work that fills them."""
import errno
import os
import tempfile

from utils.cli import UsageError

PARTIAL = '.partial'
# a filesystem with less free space than this after a failed write is taken as full
FULL_MARGIN = 64 * 1024


class DiskFullError(OSError):
    """No space left while writing a checkpoint or a run file; the earlier files are untouched."""


def filesystem_full(path):
    """Whether the filesystem holding `path` has (almost) no space left for this process."""
    try:
        stats = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_MARGIN


def is_disk_full(error, path):
    """A failed write of `path` that a full disk caused: ENOSPC / EDQUOT, or any error of a writer
    that hides the errno while the filesystem is full (checked before the partial file is removed)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, (OSError, RuntimeError)) and filesystem_full(path)


def write_staged(path, write, kept=None):
    """write(file) into `path`'s temporary name, synced to disk; returns that name, for the caller to
    move into place. Nothing partial stays behind when it fails; a full disk is a DiskFullError
    naming the file and what is `kept` (default: `path` as it was)."""
    staging = path + PARTIAL
    try:
        with open(staging, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        full = is_disk_full(e, staging)
        if os.path.exists(staging):
            os.remove(staging)
        if full:
            raise DiskFullError(errno.ENOSPC, f'no space left on device while writing {staging}; '
                                              f'{kept or path + " is kept as it was"}') from None
        raise
    return staging


def write_atomically(path, data: bytes, kept=None):
    """`data` to `path` through a temporary file moved into place."""
    os.replace(write_staged(path, lambda f: f.write(data), kept), path)


def save_image(image, path):
    """A PIL image as PNG, atomically (no empty or partial PNG on a full disk)."""
    os.replace(write_staged(path, lambda f: image.save(f, format='PNG')), path)


def save_figure(figure, path, **savefig):
    """A matplotlib figure, in the format its name gives (.png, .pdf, .svg ...), atomically."""
    kind = os.path.splitext(path)[1][1:].lower() or 'png'
    os.replace(write_staged(path, lambda f: figure.savefig(f, format=kind, **savefig)), path)


def _cannot_write(option, path, reason):
    return UsageError(f'{option} {path}: cannot write there ({reason})')


def check_writable_folder(path, option, named=None):
    """Before the work that fills it: `path` is (or is made) a folder this process can write a file
    into, on a filesystem with room; else one line naming the option and the path (or `named`, the
    file the option names in that folder)."""
    shown = named or path
    if os.path.exists(path) and not os.path.isdir(path):
        raise _cannot_write(option, shown, 'it is a file, not a folder')
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix='.write-check-') as probe:
            probe.write(b'\0' * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except (FileExistsError, NotADirectoryError):
        raise _cannot_write(option, shown, 'a file stands where a folder is needed on that path') from None
    except OSError as e:
        if is_disk_full(e, os.path.join(path, 'x')):
            raise _cannot_write(option, shown, 'no space left on device') from None
        raise _cannot_write(option, shown, e.strerror or str(e)) from None
