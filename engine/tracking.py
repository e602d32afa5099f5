"""Experiment tracking for every trainer: Weights & Biases (--log-wandb) and TensorBoard
(--log-tensorboard DIR), both optional packages, used on rank 0 only.

Per training step: the trainer's step metrics under train/ (e.g. train/loss, train/lr; x: the
update count, train/step). Per summary row (an epoch, or an evaluation interval of a trainer that
counts iterations): every numeric column of the summary.csv row under epoch/ (iteration/; x:
epoch/epoch, iteration/iteration), the same numbers summary.csv holds. W&B runs offline with
WANDB_MODE=offline; each call is its own W&B row (W&B's own step only counts rows), so no row can
be refused as out of order.
"""
import logging
import numbers
import os

from utils.cli import UsageError

_logger = logging.getLogger(__name__)


def check_tracking(args):
    """Fail now, before any training, when a requested tracker's package is missing."""
    if args.log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError('--log-wandb needs the wandb package: pip install wandb') from None
    if args.log_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UsageError('--log-tensorboard needs the tensorboard package: pip install tensorboard') from None


class Tracker:
    """The requested trackers of one run; does nothing when none was requested."""

    def __init__(self, args, output_dir, config, step_name='epoch'):
        self.wandb = self.tensorboard = None
        self.step_name = step_name
        if args.log_wandb:
            import wandb
            resume = dict(id=args.wandb_resume_id, resume='must') if args.wandb_resume_id else {}
            self.wandb = wandb.init(project=args.wandb_project, name=os.path.basename(output_dir), config=config,
                                    tags=args.wandb_tags or None, dir=output_dir, **resume)
            self.wandb.define_metric('train/*', step_metric='train/step')
            self.wandb.define_metric(f'{step_name}/*', step_metric=f'{step_name}/{step_name}')
            _logger.info('W&B run %s (%s)', self.wandb.id, self.wandb.settings.mode)
        if args.log_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=args.log_tensorboard)
            _logger.info('TensorBoard events in %s', args.log_tensorboard)

    def log_step(self, step, metrics):
        metrics = {f'train/{k}': float(v) for k, v in metrics.items()}
        if self.wandb is not None:
            self.wandb.log({'train/step': step, **metrics})
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)

    def log_summary(self, step, row):
        """The summary row of `step` (its numeric columns)."""
        metrics = {f'{self.step_name}/{k}': float(v) for k, v in row.items()
                   if isinstance(v, numbers.Number) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.log(metrics)
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if name != f'{self.step_name}/{self.step_name}':
                    self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
