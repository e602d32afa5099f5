"""What every trainer and validator shares, written once: the option vocabulary (options), device,
process group and mixed precision (runtime), the training step: forward, the agreed loss read once, backward,
clipping, optimizer, EMA and schedule (step),
and the run on disk: resume, run directory, checkpoints, summary, tracking (run). A task script
keeps only what is its own: model, data, loss, schedule, metric."""
from .checkpoint_saver import CheckpointSaver
from .files import DiskFullError, check_writable_folder, save_figure, save_image, write_atomically
from .options import (add_amp_options, add_config_option, add_device_options, add_renamed, add_training_options,
                      demo_parser, extends_run, parse_with_config, resolved_later, run_extending)
from .run import Resume, RunDirectory, complete_summary, find_resume, newest_run, resume_training, run_trainer
from .runs import ResumeError
from .runtime import (Amp, DeviceError, Runtime, distributed_model, resolve_amp, select_device, setup_runtime,
                      sync_batchnorm)
from .step import (StepResult, TrainingStep, UpdateSchedule, agreed_loss, current_lr, enable_grad_checkpointing,
                   explain_out_of_memory, optimizer_step)
from .validation import check_outputs, check_results_file, settings_from_training, write_results
