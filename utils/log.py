"""Logging for the scripts: one console handler per process, and the run's log file.

`setup_logging()` may be called any number of times (demo.py runs main.py and validate.py in one
process): it replaces the handlers it installed before instead of adding more, so no line is
printed twice. Records are kept in memory until `log_to_file(path)` names the run's file, which
then starts with everything logged since setup.
"""
import collections
import logging
import sys

_INSTALLED = []


class _Buffer(logging.Handler):
    """The most recent records, until the log file is known."""

    def __init__(self, capacity=10_000):
        super().__init__()
        self.records = collections.deque(maxlen=capacity)

    def emit(self, record):
        self.records.append(record)


class _ConsoleFormatter(logging.Formatter):
    """INFO lines as they are; other levels prefixed with their name."""

    def format(self, record):
        message = super().format(record)
        return message if record.levelno == logging.INFO else f'{record.levelname}: {message}'


def setup_logging(level=logging.INFO, stream=None):
    root = logging.getLogger()
    for handler in _INSTALLED:
        root.removeHandler(handler)
        handler.close()
    _INSTALLED.clear()
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(_ConsoleFormatter())
    buffer = _Buffer()
    for handler in (console, buffer):
        root.addHandler(handler)
        _INSTALLED.append(handler)
    root.setLevel(level)


def log_to_file(path):
    """Append every record from now on, and those buffered since setup_logging, to `path`."""
    root = logging.getLogger()
    file_handler = logging.FileHandler(path, encoding='utf-8')
    file_handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    for handler in list(_INSTALLED):
        if isinstance(handler, _Buffer):
            for record in handler.records:
                file_handler.handle(record)
            root.removeHandler(handler)
            _INSTALLED.remove(handler)
    root.addHandler(file_handler)
    _INSTALLED.append(file_handler)
    return file_handler
