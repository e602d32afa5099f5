"""A UperNet segmentor from a train_seg.py checkpoint or run directory: its backbone, dataset kind
and crop from the command line, else the checkpoint's training arguments; the sliding window
checked against the backbone; the file each image's prediction is written to."""
import os

from data import seg_dataset_kind
from engine import settings_from_training
from models import check_img_size
from models.segmentation import build_segmentor, size_divisor
from utils import CheckpointError, load_pretrained_weights
from utils.cli import UsageError
from utils.config import positive_int
from utils.seg_inference import AUG_TEST_RATIOS, check_window, default_stride


def add_inference_options(p):
    """How a segmentor runs on an image (validate_seg.py, predict.py)."""
    p.add_argument('--mode', default=None, choices=('whole', 'slide'), help='default: slide')
    p.add_argument('--crop-size', type=positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help="sliding-window crop (default: the checkpoint's training crop, else 512 512)")
    p.add_argument('--stride', type=positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help='sliding-window stride (default: 2/3 of the crop, rounded up)')
    p.add_argument('--test-scale', type=positive_int, nargs=2, default=None, metavar=('LONG', 'SHORT'),
                   help="resize before inference, keeping aspect (default: the dataset's standard scale)")
    p.add_argument('--aug-test', action='store_true', default=None,
                   help=f'multi-scale ({", ".join(map(str, AUG_TEST_RATIOS))}) and flip test-time augmentation')
    p.add_argument('--window-batch', type=positive_int, default=4, help='sliding windows run together')


def resolve_settings(args, contents):
    """(backbone, dataset kind, crop size) from the command line, else the checkpoint's training
    arguments; each one taken or overridden is said."""
    trained = dict(contents.train_args or {})
    if trained.get('dataset') is not None:
        trained['dataset'] = seg_dataset_kind(trained['dataset'])
    settings = settings_from_training(dict(model=args.model, dataset=args.dataset, crop_size=args.crop_size), trained,
                                      contents.path, defaults=dict(crop_size=[512, 512]))
    for name, value in settings.items():
        if value is None:
            raise UsageError(f'{contents.path} does not record the {name}: pass --{name.replace("_", "-")}')
    try:
        check_img_size(settings['crop_size'], '--crop-size' if args.crop_size else f'{contents.path}: crop_size')
    except ValueError as e:
        raise (UsageError if args.crop_size else CheckpointError)(str(e)) from None
    return settings


def resolve_window(args, settings):
    """(crop, stride) of the sliding window: the resolved crop, --stride or 2/3 of the crop; checked
    against the backbone's size divisor."""
    crop_size = tuple(settings['crop_size'])
    stride = tuple(args.stride) if args.stride else default_stride(crop_size)
    try:
        check_window(crop_size, stride, size_divisor(settings['model']))
    except ValueError as e:
        raise UsageError(f'--crop-size / --stride: {e}') from None
    return crop_size, stride


def build_from_checkpoint(contents, model_name, crop_size):
    """A segmentor shaped as the checkpoint: class count and head widths from its decode and
    auxiliary heads."""
    state = contents.state_dict
    key = 'decode_head.conv_seg.weight'
    if key not in state:
        raise UsageError(f'{contents.path} holds no {key}: not a segmentor checkpoint (a classification checkpoint '
                         f'initialises a backbone: train_seg.py --pretrained FILE)')
    num_classes, head_channels = state[key].shape[:2]
    aux = state.get('auxiliary_head.conv_seg.weight')
    model = build_segmentor(model_name, int(num_classes), img_size=tuple(crop_size), head_channels=int(head_channels),
                            aux_channels=int(aux.shape[1]) if aux is not None else 256,
                            auxiliary_head=aux is not None)
    load_pretrained_weights(model, contents.path, state_dict=state)
    return model


def prediction_name(dataset, index):
    """The file an image's prediction and overlay are written to: its label's stem, .png."""
    return os.path.splitext(os.path.basename(dataset.pairs[index][1]))[0] + '.png'
