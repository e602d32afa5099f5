"""What a model family tells the code that loads checkpoints into its models, registered by the
family's own file (timm's pretrained_filter_fn convention, made explicit): utils/checkpoint.py,
models/segmentation.py and hubconf.py look a model's hooks up here by its class, so the
dependency shows in the imports, not through the module a class happens to live in."""
from typing import Callable, NamedTuple, Optional, Sequence


class ModelHooks(NamedTuple):
    checkpoint_filter_fn: Callable          # (state_dict, model) -> the state dict adapted to the model
    checkpoint_variant: Callable            # state_dict -> a description of what it holds, or None
    variants: Sequence[str] = ()            # the registered model names of the family


_HOOKS = {}


def register_model_hooks(model_class, hooks: ModelHooks):
    """The model file's hooks for `model_class` and its subclasses."""
    _HOOKS[model_class] = hooks


def model_hooks(model) -> Optional[ModelHooks]:
    """The hooks registered for `model`'s class (or the nearest base class), or None."""
    return next((_HOOKS[cls] for cls in type(model).__mro__ if cls in _HOOKS), None)
