"""Checkpoint reading and weight loading."""
from .checkpoint import (CheckpointError, extract_state_dict, load_pretrained_weights, resize_pos_embed,
                         resolve_checkpoint_path, safe_load)
