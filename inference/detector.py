"""A torchvision detector from a train_det.py checkpoint or run directory: its backbone and sizes
from the command line, else the checkpoint's training arguments, else the recipe's; its kind, class
count and widths from the checkpoint's heads; overlays of a dataset's images written as they come."""
import os

from engine import save_image, settings_from_training
from models import check_img_size
from models.detection import build_detector, detector_settings, position_grid_size
from utils import load_pretrained_weights
from utils.cli import UsageError
from utils.config import positive_int
from .overlays import detection_palette, draw_detections


def add_size_options(p):
    """The size a detector runs at (validate_det.py, predict.py)."""
    p.add_argument('--test-size', type=positive_int, default=None, metavar='SHORT',
                   help="short side at inference (default: the checkpoint's, else 800)")
    p.add_argument('--max-size', type=positive_int, default=None, help="longest side (default: the checkpoint's, "
                                                                      "else 1333)")


def resolve_settings(args, contents):
    """(backbone, test size, max size) from the command line, else the checkpoint's training
    arguments, else the recipe's 800 / 1333."""
    trained = dict(contents.train_args or {})
    settings = settings_from_training(dict(model=args.model, test_size=args.test_size, max_size=args.max_size),
                                      trained, contents.path, defaults=dict(test_size=800, max_size=1333))
    if settings['model'] is None:
        raise UsageError(f'{contents.path} does not record its backbone: pass --model')
    for name in ('test_size', 'max_size'):
        try:
            check_img_size(settings[name], f'--{name.replace("_", "-")}')
        except ValueError as e:
            raise UsageError(str(e)) from None
    return settings


def build_from_checkpoint(contents, model_name, test_size, max_size):
    try:
        shape = detector_settings(contents.state_dict, contents.path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model = build_detector(model_name, shape['num_classes'], kind=shape['kind'], min_size=test_size, max_size=max_size,
                           fpn_channels=shape['fpn_channels'],
                           img_size=position_grid_size(model_name, test_size, max_size))
    load_pretrained_weights(model, contents.path, state_dict=contents.state_dict)
    return model, shape


def overlay_writer(dataset, folder, threshold):
    """on_outputs(image_ids, outputs) that draws each image's detections into folder/<stem>.png."""
    colours = detection_palette(len(dataset.class_names))

    def write(image_ids, outputs):
        for image_id, output in zip(image_ids, outputs):
            info = dataset.coco.imgs[image_id]
            drawn = draw_detections(os.path.join(dataset.root, info['file_name']),
                                    {k: v.detach().cpu() for k, v in output.items()}, dataset.class_names, threshold,
                                    colours)
            save_image(drawn, os.path.join(folder, overlay_name(dataset, image_id)))
    return write


def overlay_name(dataset, image_id):
    """The file an image's overlay is written to: its file name's stem, .png."""
    return os.path.splitext(os.path.basename(dataset.coco.imgs[image_id]['file_name']))[0] + '.png'
