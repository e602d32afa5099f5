"""Building blocks below the model files: outlook attention (PyTorch path and fused Triton
kernels, which register themselves with the one function that picks between them) and
position-embedding resizing; the label conventions of the datasets, losses and metrics; the reader
of MindSpore checkpoint files (MindCV's weights), which the model files' pretrained loading and the
checkpoint utilities share; the registry of the model families' checkpoint hooks; the checks of the
arguments every family is built with."""
from .helpers import MAX_IMG_SIZE, check_img_size, check_model_arguments, exporting, needs_grad
from .labels import IGNORE_INDEX
from .model_hooks import ModelHooks, model_hooks, register_model_hooks
from .outlook_attention import OUTLOOK_IMPLS, OutlookAttention, apply_outlook_attention, outlook_aggregate
from .pos_embed import resize_pos_embed, resize_pos_embed_nchw
from . import outlook_triton  # noqa: F401,E402  (registers the fused kernels where triton is installed)
