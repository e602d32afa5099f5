"""Small predicates shared by the layers and models."""
import torch


def exporting() -> bool:
    """Whether the graph is being exported (ONNX or torch.export): exports take the plain paths."""
    if torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, 'is_exporting', None)  # torch >= 2.7
    return bool(is_exporting and is_exporting())


def needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad
