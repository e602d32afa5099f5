"""Small predicates shared by the layers and models, and the checks of the arguments every model
family is built with."""
import numbers

import torch

# the largest input side the families are built for here (release files go up to 512, segmentation
# crops to 1024): a file or option asking for more is refused before anything is allocated
MAX_IMG_SIZE = 4096


def exporting() -> bool:
    """Whether the graph is being exported (ONNX or torch.export): exports take the plain paths."""
    if torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, 'is_exporting', None)  # torch >= 2.7
    return bool(is_exporting and is_exporting())


def needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def check_img_size(img_size, what):
    """`img_size` (an int or (H, W)) within 1..MAX_IMG_SIZE, else ValueError naming `what`."""
    sides = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size,)
    if not sides or not all(isinstance(side, int) and not isinstance(side, bool) and 0 < side <= MAX_IMG_SIZE
                            for side in sides):
        raise ValueError(f'{what} {img_size!r}: the models are built for sizes of 1 to {MAX_IMG_SIZE} pixels')


def check_model_arguments(img_size, num_classes, **rates):
    """What a model family's constructor takes from its caller (timm.create_model, torch.hub),
    checked before anything is built: the image size (whole pixels, see check_img_size), the class
    count (a whole number; 0 builds the model without a classifier) and each dropout or drop-path
    rate in `rates` (a probability below 1). ValueError names the argument."""
    check_img_size(img_size, 'img_size')
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f'num_classes {num_classes!r}: a whole number of classes (0: no classifier)')
    for name, rate in rates.items():
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise ValueError(f'{name} {rate!r}: a probability, at least 0 and below 1')
