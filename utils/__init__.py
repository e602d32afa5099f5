"""Checkpoint reading, weight loading, logging and evaluation."""
from layers import resize_pos_embed
from .checkpoint import (CheckpointContents, CheckpointError, checkpoint_num_classes, extract_state_dict,
                         load_pretrained_weights, read_checkpoint, read_state_dict, resolve_checkpoint_path,
                         resume_checkpoint, safe_load)
