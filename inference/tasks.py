"""Which kind of model a checkpoint holds, from its weights."""
from models.detection import detector_settings

TASKS = ('classify', 'seg', 'det')


def checkpoint_task(contents):
    """What the checkpoint's weights are: 'seg' (a decode head), 'det' (a detector's heads) or
    'classify'."""
    if 'decode_head.conv_seg.weight' in contents.state_dict:
        return 'seg'
    try:
        detector_settings(contents.state_dict)
        return 'det'
    except ValueError:
        return 'classify'
