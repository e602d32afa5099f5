"""Model families of this repository; importing registers their factories with timm."""
from .volo import VOLO, volo_d1, volo_d2, volo_d3, volo_d4, volo_d5
