"""Resizing position embeddings to another token grid (bicubic, align_corners=False, no
antialiasing, as the reference loader does). Both are plain TorchScript; the model files mark them
as leaves for FX, whose traced grid sizes are not Python ints."""
from typing import List

import torch
import torch.nn.functional as F


def resize_pos_embed(pos_embed: torch.Tensor, grid: List[int]) -> torch.Tensor:
    """A channels-last (1, H, W, C) position embedding resized to grid (h, w)."""
    if pos_embed.shape[1] == grid[0] and pos_embed.shape[2] == grid[1]:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=(grid[0], grid[1]), mode='bicubic',
                            align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_pos_embed_nchw(pos_embed: torch.Tensor, grid: List[int]) -> torch.Tensor:
    """A channels-first (1, C, H, W) position embedding resized to grid (h, w)."""
    if pos_embed.shape[2] == grid[0] and pos_embed.shape[3] == grid[1]:
        return pos_embed
    resized = F.interpolate(pos_embed.float(), size=(grid[0], grid[1]), mode='bicubic', align_corners=False)
    return resized.to(pos_embed.dtype)
