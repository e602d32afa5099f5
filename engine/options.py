"""The options every script shares, defined once: config file, device, mixed precision, loader
workers, seed, output and resume, logging interval, experiment tracking.

An option that only extends or re-hosts a run (more epochs, another output root, more workers, a
tracker) is marked with `extends_run` where it is defined; `--resume auto` lets a resumed command
change exactly the marked ones (`run_extending(parser)`); one the script fills in when left out
is marked with `resolved_later`. An option renamed for consistency keeps
its old spelling as an alias (`add_renamed`) that says what to use instead, on the command line
and in a YAML config alike.
"""
import argparse
import logging

from utils.config import ConfigError, non_negative_int, positive_int, read_config_defaults

_logger = logging.getLogger(__name__)


def extends_run(action):
    """Mark an option that a resumed command may change: it extends or re-hosts the run."""
    action.extends_run = True
    return action


def resolved_later(action):
    """Mark an option the script fills in when the command leaves it out (the run records the
    value it chose): a resumed command that leaves it out matches any recorded value."""
    action.resolved_later = True
    return action


def run_extending(parser):
    """The destinations of the options marked with `extends_run`."""
    return frozenset(a.dest for a in parser._actions if getattr(a, 'extends_run', False))


def resolved_options(parser):
    """The destinations of the options marked with `resolved_later`."""
    return frozenset(a.dest for a in parser._actions if getattr(a, 'resolved_later', False))


def renamed_options(parser):
    """{old destination: new destination} of the options renamed with `add_renamed`."""
    return {flag.lstrip('-').replace('-', '_'): a.dest for a in parser._actions if isinstance(a, _Renamed)
            for flag in a.option_strings}


def option_defaults(parser):
    return {a.dest: a.default for a in parser._actions if a.dest != argparse.SUPPRESS}


class _Renamed(argparse.Action):
    """An old spelling of an option: stores into the new option's destination and says so."""

    def __init__(self, option_strings, dest, new_flag=None, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        _logger.warning('%s is now %s: the old spelling still works, use the new one', option_string, self.new_flag)
        setattr(namespace, self.dest, values)


def add_renamed(parser, old_flag, new_action):
    """`old_flag` as an alias of `new_action` (an action of `parser`), with the same arguments."""
    return parser.add_argument(old_flag, dest=new_action.dest, action=_Renamed, new_flag=new_action.option_strings[-1],
                               nargs=new_action.nargs, type=new_action.type,
                               metavar=new_action.metavar, default=argparse.SUPPRESS,
                               help=f'old spelling of {new_action.option_strings[-1]}')


def add_config_option(parser, help='YAML file of argument defaults; the command line overrides it'):
    extends_run(parser.add_argument('-c', '--config', default='', metavar='FILE', help=help))


def parse_with_config(parser, argv=None):
    """Arguments from the command line over the YAML defaults of `-c FILE`; every YAML value
    passes the same type, choice and range checks as the command line (utils/config.py)."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**read_config_defaults(parser, known.config))
        except ConfigError as e:
            parser.error(str(e))
    args = parser.parse_args(remaining)
    args.config = known.config
    return args


def demo_parser(description, data):
    """A demo's command line: where its generated data (`data`) and its runs go, and the loader
    workers of its training and validation; the demo adds its own size options, and what it is not
    given goes to its trainer (parse_known_args)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--data', default=data)
    parser.add_argument('--output', default='output')
    parser.add_argument('-j', '--workers', type=non_negative_int, default=2,
                        help='data loader workers, training and validation')
    return parser


def add_device_options(parser, workers=4):
    extends_run(parser.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: CUDA when present)"))
    extends_run(parser.add_argument('-j', '--workers', type=non_negative_int, default=workers,
                                    help='data loader worker processes'))


def add_amp_options(parser):
    parser.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.amp)')
    resolved_later(parser.add_argument(  # runs recorded before None meant "the device's" say 'float16'
        '--amp-dtype', default=None, choices=['float16', 'bfloat16'],
        help='autocast dtype (default: float16 with a loss scaler on GPUs, bfloat16 on CPUs; float16 always has the '
             'loss scaler)'))
    parser.add_argument('--apex-amp', action='store_true', default=False,
                        help='the original command lines\' spelling: NVIDIA apex O1 for training when it is '
                             'importable on CUDA, else native AMP')
    parser.add_argument('--native-amp', action='store_true', default=False, help='same as --amp')


def add_training_options(parser, output='./output', seed=42, log_interval=50, workers=8):
    """What every trainer shares: config, device, AMP, workers, seed, gradient checkpointing,
    output, resume, log interval, experiment tracking, and torchrun's --local_rank."""
    add_config_option(parser)
    add_device_options(parser, workers=workers)
    add_amp_options(parser)
    parser.add_argument('--seed', type=int, default=seed)
    parser.add_argument('--grad-checkpointing', action='store_true', default=False,
                        help="recompute the backbone's blocks in backward instead of storing their activations (less "
                             "memory, more time)")
    extends_run(parser.add_argument('--output', default=output, metavar='PATH', help=f'output root (default {output})'))
    extends_run(parser.add_argument(
        '--resume', default='', metavar='PATH',
        help="checkpoint to continue, or 'auto': the newest complete checkpoint of a run under --output that was "
             "started with the same arguments"))
    extends_run(parser.add_argument('--log-interval', type=positive_int, default=log_interval,
                                    help='log every N steps'))
    add_tracking_options(parser)
    extends_run(parser.add_argument('--local_rank', '--local-rank', default=0, type=int, help=argparse.SUPPRESS))


def add_tracking_options(parser):
    for action in (
            parser.add_argument('--log-wandb', action='store_true', default=False,
                                help='log to Weights & Biases (pip install wandb)'),
            parser.add_argument('--wandb-project', default=None, type=str, help='W&B project'),
            parser.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='W&B tags'),
            parser.add_argument('--wandb-resume-id', default='', type=str, help='continue this W&B run id'),
            parser.add_argument('--log-tensorboard', default='', type=str, metavar='DIR',
                                help='write TensorBoard events to DIR (pip install tensorboard)')):
        extends_run(action)
