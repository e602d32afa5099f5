"""Model families of this repository; importing registers their factories with timm."""
from .volo import VOLO, volo_d1, volo_d2, volo_d3, volo_d4, volo_d5
from .visformer import Visformer, visformer_small, visformer_small_v2, visformer_tiny, visformer_tiny_v2
