"""Model families of this repository; importing registers their factories with timm."""
from . import visformer as _visformer, volo as _volo
from .volo import VOLO, volo_d1, volo_d2, volo_d3, volo_d4, volo_d5
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
