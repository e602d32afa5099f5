"""Training objectives."""
from .cross_entropy import (SoftTargetCrossEntropy, TokenLabelCrossEntropy, TokenLabelGTCrossEntropy,
                            TokenLabelSoftTargetCrossEntropy)
from .segmentation import SegmentationLoss, pixel_cross_entropy
