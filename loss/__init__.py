"""Training objectives."""
from .cross_entropy import (SoftTargetCrossEntropy, TokenLabelCrossEntropy, TokenLabelGTCrossEntropy,
                            TokenLabelSoftTargetCrossEntropy)
