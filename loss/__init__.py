"""Training objectives."""
from .cross_entropy import (SoftTargetCrossEntropy, TokenLabelCrossEntropy, TokenLabelGTCrossEntropy,
                            TokenLabelSoftTargetCrossEntropy)
from .segmentation import IGNORE_INDEX, SegmentationLoss, pixel_cross_entropy
