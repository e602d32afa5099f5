"""Checkpoint reading, weight loading and evaluation."""
from .checkpoint import (CheckpointError, checkpoint_num_classes, extract_state_dict, load_pretrained_weights,
                         read_state_dict, resize_pos_embed, resolve_checkpoint_path, resume_checkpoint, safe_load)
