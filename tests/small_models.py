"""A VOLO with every block type of the real ones (outlookers, downsample, transformers, class
attention, both heads) but one block per stage and narrow widths: for the tests whose subject is
the code path (compile, export, kernels), not the size."""
import models


def small_volo(img_size=32, num_classes=10, **kwargs):
    return models.volo_d1(img_size=img_size, num_classes=num_classes, layers=(1, 1, 1, 1),
                          embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), stem_hidden_dim=16, **kwargs)
