"""The exit codes every script's command line shares, and running a command in this process."""
import logging
import os
import runpy
import sys

import torch.distributed as dist


class UsageError(ValueError):
    """A setting that cannot work, reported before any compute starts."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the checkpoints written so far are kept."""


class PartialFailure(RuntimeError):
    """Part of the work was done and its results written; the rest could not be (exit code 1)."""


def message(error: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker ("Caught X in DataLoader
    worker process N. Original Traceback ..."), the original message without the traceback."""
    text = str(error)
    if text.startswith('Caught ') and 'Original Traceback' in text:
        last = text.strip().splitlines()[-1]
        return last.split(': ', 1)[1] if ': ' in last else last
    return text


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(script, argv):
    """`python SCRIPT ARGV...` run in this process, as its own command line runs it (runpy, as
    __main__): how the demos and the notebook run the commands they show, without importing a script.
    Returns the exit code (its errors are already said, in one line)."""
    saved = sys.argv
    sys.argv = [os.path.join(REPO, script), *map(str, argv)]
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def run_cli(main, argv, errors, logger: logging.Logger, interrupted='interrupted'):
    """main(argv); an expected error (one of `errors`) is logged in one line and exits with 2, a
    PartialFailure with 1, Ctrl-C exits with 130 after `interrupted` is logged. A process group
    still open is closed first."""
    try:
        return main(argv)
    except PartialFailure as e:
        logger.error('%s', e)
        sys.exit(1)
    except errors as e:
        logger.error('%s', message(e))
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
    except KeyboardInterrupt:
        logger.error(interrupted)
        sys.exit(130)
