"""Resizing position embeddings to another token grid."""
import torch
import torch.nn.functional as F


def resize_pos_embed(pos_embed: torch.Tensor, grid) -> torch.Tensor:
    """Bicubic resize (align_corners=False, no antialiasing, as the reference loader does) of a
    channels-last (1, H, W, C) position embedding to grid (h, w)."""
    grid = tuple(grid)
    if tuple(pos_embed.shape[1:3]) == grid:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=grid, mode='bicubic',
                            align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)
