"""Small predicates shared by the layers and models."""
import torch


def exporting() -> bool:
    """Whether the graph is being exported (ONNX or torch.export): exports take the plain paths."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad
