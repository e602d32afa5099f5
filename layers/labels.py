"""Label conventions shared by the datasets, losses and metrics (the bottom of the import tree,
so that each of them reads the one definition)."""

# segmentation labels: this value marks pixels that are not scored (mmseg's and Cityscapes' 255)
IGNORE_INDEX = 255
