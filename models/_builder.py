"""What both families' builders add to timm's build_model_with_cfg."""
from layers import check_img_size


def pretrained_overlay(img_size=None, overlay=None) -> dict:
    """The pretrained-cfg overlay of a build: the input size asked for (the release's other
    settings kept), then the caller's overlay. A caller's `url` is the source it asked for, so the
    Hugging Face copy timm would otherwise prefer is dropped unless the overlay names one too."""
    out = {}
    if img_size is not None:
        check_img_size(img_size, 'img_size')  # before anything is computed from it
        out['input_size'] = (3, *((img_size, img_size) if isinstance(img_size, int) else tuple(img_size)))
    overlay = dict(overlay or {})
    if overlay.get('url') and 'hf_hub_id' not in overlay:
        overlay['hf_hub_id'] = None
    out.update(overlay)
    return out
