"""Detection: the backbone adapter's maps (names, strides, channels) for every backbone, and
torchvision's detectors around it (training losses, evaluation outputs)."""
import pytest
import torch

from models.detection import DETECTORS, FPN_CHANNELS, DetectionBackbone, build_detector, detector_settings, inference_size
from models.segmentation import SEGMENTATION_BACKBONES

SMALL_VOLO = dict(  # one block per stage, narrow (tests/small_models.py's settings)
    layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), stem_hidden_dim=16)


@pytest.mark.parametrize('name', SEGMENTATION_BACKBONES)
@pytest.mark.parametrize('one_stage', [False, True])
def test_adapter_maps_for_every_backbone_at_a_non_square_size(name, one_stage):
    with torch.device('meta'):
        backbone = DetectionBackbone(name, img_size=(128, 192), one_stage=one_stage)
        maps = backbone(torch.empty(1, 3, 96, 160))  # another size than built for: pos_embed resized
    strides = (8, 16, 32, 64, 128) if one_stage else (4, 8, 16, 32, 64)
    assert list(maps) == (['0', '1', '2', 'p6', 'p7'] if one_stage else ['0', '1', '2', '3', 'pool'])
    assert [m.shape[1] for m in maps.values()] == [FPN_CHANNELS] * 5 == [backbone.out_channels] * 5
    for m, stride in zip(maps.values(), strides):
        assert tuple(m.shape[2:]) == (-(-96 // stride), -(-160 // stride)), (name, stride)
    # the classification model's keys, so release files initialise it
    assert any(k.startswith(('patch_embed.', 'stem.')) for k in backbone.body.state_dict())


def _targets():
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:50, 20:70] = 1
    masks[1, 40:90, 60:120] = 1
    return [dict(boxes=torch.tensor([[20., 10., 70., 50.], [60., 40., 120., 90.]]), labels=torch.tensor([1, 3]),
                 masks=masks)]


@pytest.mark.parametrize('kind', DETECTORS)
def test_torchvision_detectors_train_and_evaluate_on_the_adapter(kind):
    torch.manual_seed(0)
    model = build_detector('volo_d1', 3, kind=kind, min_size=96, max_size=128, img_size=(96, 128), **SMALL_VOLO)
    images = [torch.rand(3, 96, 128)]
    model.train()
    losses = model(images, _targets())
    expected = {'mask_rcnn': {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'},
                'faster_rcnn': {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'},
                'retinanet': {'classification', 'bbox_regression'}}[kind]
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.patch_embed.conv[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out, = model(images)
    assert {'boxes', 'labels', 'scores'} <= set(out) and out['boxes'].shape[1] == 4
    if kind == 'mask_rcnn':
        assert out['masks'].shape[1:] == (1, 96, 128)
    assert detector_settings(model.state_dict()) == {'kind': kind, 'num_classes': 3, 'fpn_channels': FPN_CHANNELS}
    if kind == 'retinanet':
        assert model.detections_per_img == 100  # mmdet's (torchvision: 300)
    else:
        model.train()
        assert model.rpn.post_nms_top_n() == 1000  # mmdet's training proposals (torchvision: 2000)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='kind must be one of'):
        build_detector('volo_d1', 3, kind='yolo')
    with pytest.raises(ValueError, match='unknown detection backbone'):
        build_detector('resnet50', 3)
    with pytest.raises(ValueError, match='num_classes must be a positive integer'):
        build_detector('volo_d1', 0)
    with pytest.raises(ValueError, match='fpn_channels must be a positive integer'):
        build_detector('volo_d1', 3, fpn_channels=0)


@pytest.mark.parametrize('kind', DETECTORS)
def test_narrow_heads_and_the_inference_size(kind):
    """fpn_channels narrows the FPN and every head (the box MLP to 4x it); the checkpoint says so back."""
    with torch.device('meta'):
        model = build_detector('volo_d1', 5, kind=kind, min_size=(64, 80), max_size=128, fpn_channels=16,
                               rois_per_image=64, img_size=(64, 128), **SMALL_VOLO)
    assert detector_settings(model.state_dict()) == {'kind': kind, 'num_classes': 5, 'fpn_channels': 16}
    assert model.backbone.out_channels == 16
    if kind != 'retinanet':
        assert model.roi_heads.box_head.fc6.weight.shape == (64, 16 * 7 * 7)
        assert model.roi_heads.box_predictor.cls_score.weight.shape == (6, 64)
        assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    if kind == 'mask_rcnn':
        assert model.roi_heads.mask_head[0][0].weight.shape[:2] == (16, 16)
        assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.shape[:2] == (6, 16)
    with inference_size(model, 96, 160):
        assert (model.transform.min_size, model.transform.max_size) == ((96,), 160)
    assert (model.transform.min_size, model.transform.max_size) == ((64, 80), 128)
    with pytest.raises(ValueError, match='holds no detector'):
        detector_settings(model.backbone.body.state_dict(), 'cls.pth')
