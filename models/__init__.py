"""Model families of this repository; importing registers their factories with timm."""
import functools

import timm
import torch

from layers import MAX_IMG_SIZE, check_img_size  # noqa: F401  (the scripts' checks of their sizes)
from . import visformer as _visformer, volo as _volo
from .volo import VOLO, DenseTrainingForward, volo_d1, volo_d2, volo_d3, volo_d4, volo_d5
from .visformer import Visformer, visformer_small, visformer_small_v2, visformer_tiny, visformer_tiny_v2

NUMERICS = ('mindcv',)
MINDCV_MODELS = tuple(_volo.VARIANTS) + tuple(_visformer.VARIANTS)  # the families MindCV also has


def numerics_kwargs(model_name: str, numerics=None) -> dict:
    """Constructor arguments that give `model_name` the numerics a checkpoint was trained with:
    {} for this repository's own (None), MindCV's (tanh GELU; VOLO: LayerNorm eps 1e-7 and the
    class-token head only) for 'mindcv'."""
    if numerics is None:
        return {}
    if numerics not in NUMERICS:
        raise ValueError(f'unknown numerics {numerics!r}; known: {", ".join(NUMERICS)}')
    for family in (_volo, _visformer):
        if model_name in family.VARIANTS:
            return dict(family.MINDCV_NUMERICS)
    raise ValueError(f'{model_name} has no MindCV counterpart (VOLO and Visformer do)')


@functools.lru_cache(maxsize=32)
def _meta_shapes(model_name, settings):
    """{key: shape} of `model_name` built with `settings` on the meta device (no memory)."""
    with torch.device('meta'):
        return {k: tuple(v.shape) for k, v in timm.create_model(model_name, **dict(settings)).state_dict().items()}


def check_file_settings(model_name, state_dict, source, **settings):
    """Before a model is built from the settings a file states about itself (image size, class
    count, ...): the tensors whose shapes those settings decide (pos_embed's grid follows the image
    size, the heads' rows the class count) must have those shapes in the file, checked on models
    built on the meta device (no memory), and the image size must be one the families are built
    for. ValueError names the file, the setting and the first tensor that disagrees."""
    if settings.get('img_size') is not None:
        check_img_size(settings['img_size'], f'{source}: img_size')
    if not timm.is_model(model_name):
        raise ValueError(f'{source}: model {model_name!r} is not a model name of this repository or timm\'s registry')
    stated = {k: settings[k] for k in ('img_size', 'num_classes') if k in settings}
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    expected = _meta_shapes(model_name, tuple(sorted(frozen.items())))
    default = _meta_shapes(model_name, tuple(sorted((k, v) for k, v in frozen.items() if k not in stated)))
    for key, tensor in state_dict.items():
        if key not in expected or key not in default or expected[key] == default[key]:
            continue  # a tensor whose shape the stated settings do not decide
        want, base = expected[key], default[key]
        decided = [i for i in range(len(want)) if i >= len(base) or want[i] != base[i]]
        if tensor.ndim != len(want) or any(tensor.shape[i] != want[i] for i in decided):
            raise ValueError(f'{source}: {key} has the shape {list(tensor.shape)}, but {model_name} with the '
                             f'settings the file states ({", ".join(f"{k}={v}" for k, v in stated.items())}) has '
                             f'{list(want)}: the file\'s settings do not belong to its weights')
