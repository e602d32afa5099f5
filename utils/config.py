"""YAML files of argument defaults (`-c FILE`), checked exactly as the command line is.

Every value goes through its argument's type, choices and arity; a flag takes true/false only;
null only where the argument's default is null. Errors name the file, the key and what was expected.
"""
import argparse
import logging
import math
import os

import yaml

_logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file, or a value in it, that the command line would not accept."""


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text}')
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text}')
    return value


def dataset_type(text):
    """--dataset: '' or 'folder' (class folders), 'wds' (tar shards) or 'hfds/NAME' (Hugging Face)."""
    if text in ('', 'folder', 'wds') or (text.startswith('hfds/') and len(text) > 5):
        return text
    raise argparse.ArgumentTypeError(f"expected '', 'folder', 'wds' or 'hfds/NAME', got {text!r}")


def _describe_type(action):
    if action.type in (None, str):
        return 'a string'
    return {int: 'an integer', float: 'a number', positive_int: 'a positive integer',
            non_negative_int: 'an integer >= 0',
            dataset_type: "'', 'folder', 'wds' or 'hfds/NAME'"}.get(action.type, getattr(action.type, '__name__', 'a value'))


def _convert(action, value, where):
    """One scalar value through the argument's type and choices, as the command line would."""
    if isinstance(value, (list, dict)):
        raise ConfigError(f'{where}: expected {_describe_type(action)}, got {type(value).__name__} {value!r}')
    if isinstance(value, bool) or value is None:
        raise ConfigError(f'{where}: expected {_describe_type(action)}, got {value!r}')
    if action.type in (int, positive_int, non_negative_int) and isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(f'{where}: expected {_describe_type(action)}, got {value!r}')
        value = int(value)
    try:
        converted = action.type(str(value)) if action.type is not None else str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f'{where}: expected {_describe_type(action)}, got {value!r} ({e})') from None
    if action.choices is not None and converted not in action.choices:
        choices = ', '.join(repr(c) for c in action.choices)
        raise ConfigError(f'{where}: {converted!r} is not one of {choices}')
    return converted


def check_value(action, value, where):
    """The value an argument gets from a config entry, checked; raises ConfigError."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f'{where}: expected true or false, got {value!r}')
        return value
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f'{where}: expected {_describe_type(action)}, got null')
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if not isinstance(value, list):
            value = [value]
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ConfigError(f'{where}: expected a list of {action.nargs} values, got {value!r}')
        if action.nargs == '+' and not value:
            raise ConfigError(f'{where}: expected at least one value, got an empty list')
        return [_convert(action, v, where) for v in value]
    return _convert(action, value, where)


def read_config_defaults(parser, path):
    """{dest: value} from a YAML file of argument defaults, every value checked."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path} does not exist')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        raise ConfigError(f'config file {path} is not valid YAML{where}: {getattr(e, "problem", e)}') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f'cannot read config file {path}: {e}') from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f'config file {path} must hold a mapping of argument names to values, '
                          f'got a {type(cfg).__name__}')
    actions, renamed = {}, {}
    for action in parser._actions:
        if action.dest in ('help', 'config'):
            continue
        if getattr(action, 'new_flag', None):  # an old spelling: its keys are the old option names
            renamed.update({flag.lstrip('-').replace('-', '_'): action for flag in action.option_strings})
        else:
            actions.setdefault(action.dest, action)
    defaults = {}
    for key, value in cfg.items():
        name = str(key).replace('-', '_')
        if name in renamed:
            alias = renamed[name]
            _logger.warning('config file %s: key %s is now %s', path, key, alias.new_flag.lstrip('-'))
            name = alias.dest
        if name not in actions:
            defaults.setdefault(None, []).append(str(key))
            continue
        defaults[name] = check_value(actions[name], value, f'config file {path}, key {key}')
    if None in defaults:
        raise ConfigError(f'config file {path}: unknown argument(s) {", ".join(sorted(defaults[None]))}')
    return defaults
