"""Checkpoint reading, weight loading, logging and evaluation (tlt.utils' load_pretrained_weights
included)."""
from .checkpoint import (CheckpointContents, CheckpointError, checkpoint_num_classes, extract_state_dict,
                         load_pretrained_weights, read_checkpoint, read_state_dict, resolve_checkpoint_path,
                         resume_checkpoint, safe_load)
