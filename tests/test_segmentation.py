"""Segmentation building blocks: dense backbone features, the pyramid, mmseg's heads (against a
plain re-computation of segmentation.md §3), sliding-window and flip inference (§5), the metric
(hand-computed), and the paired image/label transforms (§4)."""
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import models
from data.seg_transforms import (SegTrainTransform, hflip, keep_ratio_size, pad, random_crop, random_rescale,
                                 resize)
from layers import resize_pos_embed
from models.segmentation import FCNHead, UPerHead, build_segmentor, pyramid_taps
from utils.seg_inference import check_window, predict_scores, slide_inference, slide_windows, whole_inference
from utils.seg_metrics import SegmentationMetric

VOLO_CHANNELS = {'volo_d1': (192, 384), 'volo_d2': (256, 512), 'volo_d3': (256, 512), 'volo_d4': (384, 768),
                 'volo_d5': (384, 768)}
VISFORMER_FEATURES = {'visformer_tiny': ((96, 192, 384), (8, 16, 32)), 'visformer_small': ((192, 384, 768), (8, 16, 32)),
                      'visformer_tiny_v2': ((48, 96, 192, 384), (4, 8, 16, 32)),
                      'visformer_small_v2': ((64, 128, 256, 512), (4, 8, 16, 32))}


# ---------------------------------------------------------------- dense features

@pytest.mark.parametrize('name', sorted(VOLO_CHANNELS))
def test_volo_intermediates_shapes_strides_channels(name):
    c0, c1 = VOLO_CHANNELS[name]
    model = timm.create_model(name, img_size=32).eval()
    assert [f['num_chs'] for f in model.feature_info] == [c0, c1, c1, c1]
    assert [f['reduction'] for f in model.feature_info] == [8, 16, 16, 16]
    for h, w in ((32, 32), (48, 80)):  # the built size and a non-square one: pos_embed resized on the fly
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
        assert [tuple(f.shape) for f in feats] == [(1, c0, h // 8, w // 8)] + [(1, c1, h // 16, w // 16)] * 3


@pytest.mark.parametrize('name', sorted(VISFORMER_FEATURES))
def test_visformer_intermediates_shapes_strides_channels(name):
    channels, strides = VISFORMER_FEATURES[name]
    model = timm.create_model(name, img_size=64).eval()
    assert [f['num_chs'] for f in model.feature_info] == list(channels)
    assert [f['reduction'] for f in model.feature_info] == list(strides)
    for h, w in ((64, 64), (96, 160)):
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
        assert [tuple(f.shape) for f in feats] == [(1, c, h // s, w // s) for c, s in zip(channels, strides)]


@pytest.mark.parametrize('name,indices', [('volo_d1', (1, 3)), ('volo_d1', (0,)), ('visformer_tiny', (0, 2)),
                                          ('visformer_small_v2', (1, 2))])
def test_features_only_through_timm_equals_the_full_model(name, indices):
    torch.manual_seed(0)
    full = timm.create_model(name, img_size=64).eval()
    feats = timm.create_model(name, img_size=64, features_only=True, out_indices=indices).eval()
    feats.model.load_state_dict({k: v for k, v in full.state_dict().items() if k in feats.model.state_dict()})
    assert feats.feature_info.channels() == [full.feature_info[i]['num_chs'] for i in indices]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=list(indices), intermediates_only=True)
        got = feats(x)
    assert len(got) == len(indices)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', ['volo_d1', 'visformer_tiny'])
def test_classification_output_unchanged_and_final_features_agree(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits, rtol=0, atol=0)


def test_pos_embed_resized_on_the_fly_equals_a_model_built_for_that_size():
    torch.manual_seed(0)
    small = models.volo_d1(img_size=32).eval()
    big = models.volo_d1(img_size=(48, 80)).eval()
    state = small.state_dict()
    state['pos_embed'] = resize_pos_embed(state['pos_embed'], (3, 5))
    big.load_state_dict(state)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x))
        for a, b in zip(small.forward_intermediates(x, intermediates_only=True),
                        big.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b)


def test_mix_token_never_runs_in_the_feature_path():
    model = models.volo_d1(img_size=32)
    model.train()
    for m in model.modules():  # batch statistics would differ between batches, not between seeds
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model.forward_intermediates(x, intermediates_only=True)
    torch.manual_seed(2)
    b = model.forward_intermediates(x, intermediates_only=True)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    torch.manual_seed(1)  # whereas the training forward mixes tokens by a random box
    boxes = {model.forward_train(x)[2] for _ in range(5)}
    assert len(boxes) > 1


def test_pruned_backbone_loads_classification_checkpoints(tmp_path):
    from utils import CheckpointError, load_pretrained_weights
    classifier = models.volo_d1(img_size=32)
    torch.save(classifier.state_dict(), tmp_path / 'd1.pth')
    seg = build_segmentor('volo_d1', 5, img_size=(64, 96))
    load_pretrained_weights(seg.backbone, str(tmp_path / 'd1.pth'))  # strict: head keys dropped, pos_embed resized
    torch.testing.assert_close(seg.backbone.pos_embed, resize_pos_embed(classifier.pos_embed.detach(), (4, 6)))
    torch.testing.assert_close(seg.backbone.network[3][0].mlp.fc1.weight, classifier.network[3][0].mlp.fc1.weight)
    torch.save(models.volo_d2(img_size=32).state_dict(), tmp_path / 'd2.pth')
    with pytest.raises(CheckpointError, match='looks like volo_d2, but the model is volo_d1'):
        load_pretrained_weights(seg.backbone, str(tmp_path / 'd2.pth'))
    with pytest.raises(CheckpointError, match='classification checkpoint'):
        load_pretrained_weights(seg, str(tmp_path / 'd1.pth'))


# ---------------------------------------------------------------- pyramid and segmentor

def test_pyramid_taps_and_strides():
    assert pyramid_taps([8, 16, 16, 16]) == [0, 0, 2, 3]   # VOLO
    assert pyramid_taps([8, 16, 32]) == [0, 0, 1, 2]       # Visformer v1
    assert pyramid_taps([4, 8, 16, 32]) == [0, 1, 2, 3]    # Visformer v2
    seg = build_segmentor('volo_d1', 7, img_size=64, head_channels=32, aux_channels=16).eval()
    with torch.no_grad():
        levels = seg.extract_features(torch.randn(1, 3, 64, 96))
    assert [tuple(x.shape[1:]) for x in levels] == [(192, 16, 24), (192, 8, 12), (384, 4, 6), (384, 2, 3)]


@pytest.mark.parametrize('name', ['volo_d1', 'visformer_tiny', 'visformer_tiny_v2'])
def test_segmentor_outputs(name):
    seg = build_segmentor(name, 7, img_size=64, head_channels=32, aux_channels=16)
    x = torch.randn(2, 3, 64, 96)
    seg.train()
    decode, aux = seg(x)
    assert decode.shape == (2, 7, 16, 24) and aux.shape == (2, 7, 4, 6)
    seg.eval()
    with torch.no_grad():
        assert seg(x).shape == (2, 7, 64, 96)
    parts = {k.split('.')[0] for k in seg.state_dict()}
    assert parts - {'neck'} == {'backbone', 'decode_head', 'auxiliary_head'}  # v2's neck has no weights
    assert ('neck' in parts) == (name != 'visformer_tiny_v2')
    with pytest.raises(ValueError, match='multiples of'):
        seg(torch.randn(1, 3, 64, 72))


def test_build_segmentor_rejects_bad_arguments():
    with pytest.raises(ValueError, match='unknown segmentation backbone'):
        build_segmentor('resnet50', 5)
    with pytest.raises(ValueError, match='num_classes'):
        build_segmentor('volo_d1', 0)


# ---------------------------------------------------------------- heads against §3

MMSEG_UPERHEAD_KEYS = (
    ['conv_seg.weight', 'conv_seg.bias']
    + [f'psp_modules.{i}.1.{p}' for i in range(4) for p in ('conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean',
                                                            'bn.running_var', 'bn.num_batches_tracked')]
    + [f'{m}.{p}' for m in ['bottleneck', 'fpn_bottleneck'] + [f'lateral_convs.{i}' for i in range(3)]
       + [f'fpn_convs.{i}' for i in range(3)]
       for p in ('conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked')])


def _conv_module(x, sd, prefix, padding):
    """mmcv ConvModule in eval mode: conv (no bias), BN with running statistics, ReLU."""
    x = F.conv2d(x, sd[f'{prefix}.conv.weight'], padding=padding)
    x = F.batch_norm(x, sd[f'{prefix}.bn.running_mean'], sd[f'{prefix}.bn.running_var'], sd[f'{prefix}.bn.weight'],
                     sd[f'{prefix}.bn.bias'], training=False, eps=1e-5)
    return F.relu(x)


def _up(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


def reference_uperhead(inputs, sd, pool_scales=(1, 2, 3, 6)):
    """segmentation.md §3, written out with functional ops on a state dict."""
    last = inputs[-1]
    pooled = [_up(_conv_module(F.adaptive_avg_pool2d(last, s), sd, f'psp_modules.{i}.1', 0), last.shape[2:])
              for i, s in enumerate(pool_scales)]
    psp = _conv_module(torch.cat([last] + pooled, 1), sd, 'bottleneck', 1)
    laterals = [_conv_module(inputs[i], sd, f'lateral_convs.{i}', 0) for i in range(3)] + [psp]
    for i in (3, 2, 1):
        laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1].shape[2:])
    outs = [_conv_module(laterals[i], sd, f'fpn_convs.{i}', 1) for i in range(3)] + [laterals[3]]
    outs = [outs[0]] + [_up(o, outs[0].shape[2:]) for o in outs[1:]]
    fused = _conv_module(torch.cat(outs, 1), sd, 'fpn_bottleneck', 1)
    return F.conv2d(fused, sd['conv_seg.weight'], sd['conv_seg.bias'])


def _random_state(module):
    """The module's state dict with every tensor random (BN statistics included), keyed as mmseg."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in module.state_dict().items():
        if k.endswith('num_batches_tracked'):
            state[k] = torch.tensor(7)
        elif k.endswith('running_var'):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=g) * 0.1
    return state


def _conv_module_params(c_in, c_out, k):
    """mmcv's ConvModule: a k x k conv without bias, BN (weight and bias; its running statistics are
    buffers)."""
    return c_in * c_out * k * k + 2 * c_out


def _uperhead_params(in_channels, num_classes, channels=512, pool_scales=(1, 2, 3, 6)):
    """segmentation.md §3's UPerHead summed layer by layer."""
    ppm = len(pool_scales) * _conv_module_params(in_channels[-1], channels, 1)
    bottleneck = _conv_module_params(in_channels[-1] + len(pool_scales) * channels, channels, 3)
    laterals = sum(_conv_module_params(c, channels, 1) for c in in_channels[:-1])
    fpn_convs = (len(in_channels) - 1) * _conv_module_params(channels, channels, 3)
    fpn_bottleneck = _conv_module_params(len(in_channels) * channels, channels, 3)
    conv_seg = channels * num_classes + num_classes  # 1x1 with bias
    return ppm + bottleneck + laterals + fpn_convs + fpn_bottleneck + conv_seg


def test_uperhead_keys_shapes_and_parameter_count_as_mmseg():
    head = UPerHead([192, 384, 384, 384], 150)
    assert sorted(head.state_dict()) == sorted(MMSEG_UPERHEAD_KEYS)
    sd = head.state_dict()
    assert tuple(sd['bottleneck.conv.weight'].shape) == (512, 2432, 3, 3)
    assert tuple(sd['fpn_bottleneck.conv.weight'].shape) == (512, 2048, 3, 3)
    assert tuple(sd['conv_seg.weight'].shape) == (150, 512, 1, 1)
    # the count of §3's layers, summed here, is the one segmentation.md states for this head
    assert sum(p.numel() for p in head.parameters()) == _uperhead_params([192, 384, 384, 384], 150) == 29_088_918
    small = UPerHead([16, 24, 32, 40], 5, channels=8)
    assert sum(p.numel() for p in small.parameters()) == _uperhead_params([16, 24, 32, 40], 5, channels=8)
    # the auxiliary FCNHead: one 3x3 ConvModule to 256 and conv_seg
    assert sum(p.numel() for p in FCNHead(384, 150).parameters()) == _conv_module_params(384, 256, 3) + 256 * 150 + 150


def test_uperhead_equals_reference_computation_on_an_mmseg_state_dict():
    head = UPerHead([16, 24, 32, 40], 5, channels=8).eval()
    mmseg_state = {k: v for k, v in _random_state(head).items()}
    head.load_state_dict(mmseg_state, strict=True)
    inputs = [torch.randn(2, c, s, s + 2) for c, s in zip([16, 24, 32, 40], [16, 8, 4, 2])]
    with torch.no_grad():
        torch.testing.assert_close(head(inputs), reference_uperhead(inputs, mmseg_state), rtol=1e-4, atol=1e-5)
        mmseg_state['fpn_bottleneck.conv.weight'] = mmseg_state['fpn_bottleneck.conv.weight'] * 2  # a wrong head differs
        assert not torch.allclose(head(inputs), reference_uperhead(inputs, mmseg_state), rtol=1e-4, atol=1e-5)


def test_fcnhead_keys_and_reference_computation():
    head = FCNHead(24, 5, channels=8, in_index=2).eval()
    assert sorted(head.state_dict()) == sorted(
        ['conv_seg.weight', 'conv_seg.bias', 'convs.0.conv.weight', 'convs.0.bn.weight', 'convs.0.bn.bias',
         'convs.0.bn.running_mean', 'convs.0.bn.running_var', 'convs.0.bn.num_batches_tracked'])
    state = _random_state(head)
    head.load_state_dict(state, strict=True)
    inputs = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(1, 24, 6, 10)]
    with torch.no_grad():
        expected = F.conv2d(_conv_module(inputs[2], state, 'convs.0', 1), state['conv_seg.weight'], state['conv_seg.bias'])
        torch.testing.assert_close(head(inputs), expected, rtol=1e-4, atol=1e-5)
    assert FCNHead(384, 150).convs[0].conv.weight.shape == (256, 384, 3, 3)


def test_segmentor_heads_move_to_and_from_mmseg_key_names():
    seg = build_segmentor('volo_d1', 6, img_size=32, head_channels=16, aux_channels=8)
    state = seg.state_dict()
    mmseg_like = {k: v.clone() for k, v in state.items() if k.startswith(('decode_head.', 'auxiliary_head.'))}
    other = build_segmentor('volo_d1', 6, img_size=32, head_channels=16, aux_channels=8)
    other.decode_head.load_state_dict({k[len('decode_head.'):]: v for k, v in mmseg_like.items()
                                       if k.startswith('decode_head.')}, strict=True)
    other.auxiliary_head.load_state_dict({k[len('auxiliary_head.'):]: v for k, v in mmseg_like.items()
                                          if k.startswith('auxiliary_head.')}, strict=True)
    for k, v in other.state_dict().items():
        if k.startswith(('decode_head.', 'auxiliary_head.')):
            torch.testing.assert_close(v, state[k])


# ---------------------------------------------------------------- inference (§5)

class PixelEcho(torch.nn.Module):
    """Logits = the input's first `k` channels: a window's output is its input crop, so
    sliding-window inference of it must give back the input exactly."""
    size_divisor = 1

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x[:, :self.k]


def _expected_counts(h, w, crop, stride):
    """Windows covering each pixel, from §5's placement written independently."""
    counts = np.zeros((h, w), dtype=int)
    (ch, cw), (sh, sw) = crop, stride
    rows, cols = max(h - ch + sh - 1, 0) // sh + 1, max(w - cw + sw - 1, 0) // sw + 1
    for i in range(rows):
        y2 = min(i * sh + ch, h)
        y1 = max(y2 - ch, 0)
        for j in range(cols):
            x2 = min(j * sw + cw, w)
            x1 = max(x2 - cw, 0)
            counts[y1:y2, x1:x2] += 1
    return counts, rows * cols


@pytest.mark.parametrize('h,w,crop,stride', [(50, 70, (32, 32), (20, 20)), (64, 64, (32, 48), (32, 16)),
                                             (37, 101, (16, 32), (5, 7)), (20, 20, (32, 32), (16, 16))])
def test_sliding_windows_cover_every_pixel_the_expected_number_of_times(h, w, crop, stride):
    windows = slide_windows(h, w, crop, stride)
    counts = np.zeros((h, w), dtype=int)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop[0], h), min(crop[1], w))
        counts[y1:y2, x1:x2] += 1
    expected, n = _expected_counts(h, w, crop, stride)
    assert len(windows) == n
    np.testing.assert_array_equal(counts, expected)
    assert counts.min() >= 1
    x = torch.randn(1, 3, h, w)
    torch.testing.assert_close(slide_inference(PixelEcho(3), x, 3, crop, stride, batch_size=3), x)


def test_slide_with_crop_equal_to_the_image_equals_whole_inference():
    seg = build_segmentor('volo_d1', 4, img_size=32, head_channels=16, aux_channels=8).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(seg, x, 4, (48, 64), (16, 16)), whole_inference(seg, x))
        # a smaller image is one padded window
        assert slide_inference(seg, x[:, :, :20, :30], 4, (32, 32), (16, 16)).shape == (1, 4, 20, 30)


def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(3)) / 2)  # horizontally symmetric kernels
    conv.size_divisor = 1
    x = torch.randn(1, 3, 24, 40)
    plain = predict_scores(conv, x, (24, 40), 5)
    flipped = predict_scores(conv, x, (24, 40), 5, flip=True)
    torch.testing.assert_close(flipped, plain)
    asymmetric = torch.nn.Conv2d(3, 5, 3, padding=1)
    asymmetric.size_divisor = 1
    assert not torch.allclose(predict_scores(asymmetric, x, (24, 40), 5, flip=True),
                              predict_scores(asymmetric, x, (24, 40), 5))
    # multi-scale: scores averaged over passes, resized to the output size
    scores = predict_scores(conv, x, (12, 20), 5, ratios=(0.5, 1.0), flip=True)
    assert scores.shape == (1, 5, 12, 20)
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 12, 20))


@pytest.mark.parametrize('crop,stride,match', [((32, 32), (0, 16), 'stride'), ((32, 32), (40, 16), 'stride'),
                                               ((30, 32), (16, 16), 'multiples of 16'), ((32, 32), (8.5, 8), 'integers')])
def test_bad_windows_are_clear_errors(crop, stride, match):
    with pytest.raises(ValueError, match=match):
        check_window(crop, stride)


# ---------------------------------------------------------------- metric (§5)

def test_metric_hand_computed_with_ignore_and_absent_classes():
    metric = SegmentationMetric(4, class_names=['a', 'b', 'c', 'd'])
    label = torch.tensor([[0, 0, 1, 255], [1, 1, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 0, 2, 0]])
    metric.update(pred, label)
    # valid pixels: labels 0,0,1,1,1,0 vs preds 0,1,1,1,0,0 (ignore pixels predicted 3 and 2 do not count)
    # class 0: inter 2, pred 3, label 3 -> IoU 2/4; class 1: inter 2, pred 3, label 3 -> 2/4; 2, 3: absent -> NaN
    r = metric.compute()
    assert r['mIoU'] == pytest.approx(50.0)
    assert r['mAcc'] == pytest.approx(100 * 2 / 3)
    assert r['aAcc'] == pytest.approx(100 * 4 / 6)
    per = {row['class']: row for row in r['per_class']}
    assert np.isnan(per['c']['IoU']) and np.isnan(per['d']['Acc'])
    # a class predicted but absent from the labels: IoU 0 counts in mIoU, its Acc (NaN) not in mAcc
    metric.update(torch.tensor([[3]]), torch.tensor([[0]]))
    r = metric.compute()
    assert r['mIoU'] == pytest.approx(100 * (2 / 5 + 2 / 4 + 0) / 3)
    assert r['mAcc'] == pytest.approx(100 * (2 / 4 + 2 / 3) / 2)
    assert np.isnan(r['per_class'][2]['IoU']) and r['per_class'][3]['IoU'] == 0


def test_metric_accumulates_over_images_of_different_sizes():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 5, (h, w)), np.where(rng.random((h, w)) < 0.1, 255, rng.integers(0, 5, (h, w))))
             for h, w in ((7, 9), (12, 5), (3, 30))]
    metric = SegmentationMetric(5)
    for pred, label in pairs:
        metric.update(torch.from_numpy(pred), torch.from_numpy(label))
    preds = np.concatenate([p.ravel() for p, _ in pairs])
    labels = np.concatenate([lab.ravel() for _, lab in pairs])
    keep = labels != 255
    conf = np.zeros((5, 5))
    np.add.at(conf, (labels[keep], preds[keep]), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    r = metric.compute()
    assert r['mIoU'] == pytest.approx(100 * np.mean(inter / union))
    assert r['aAcc'] == pytest.approx(100 * inter.sum() / conf.sum())
    assert r['mAcc'] == pytest.approx(100 * np.mean(inter / conf.sum(1)))
    with pytest.raises(ValueError, match='differ in size'):
        metric.update(torch.zeros(2, 3), torch.zeros(3, 2))


# ---------------------------------------------------------------- transforms (§4)

def _marked_pair(h=120, w=160, top=30, left=100, size=12):
    image = np.full((h, w, 3), 40, dtype=np.uint8)
    image[top:top + size, left:left + size] = (250, 10, 10)
    label = np.zeros((h, w), dtype=np.uint8)
    label[:, : w // 3] = 1
    label[top:top + size, left:left + size] = 7
    return image, label


@pytest.mark.parametrize('seed', range(6))
def test_label_follows_its_image_through_resize_crop_and_flip(seed):
    rng = random.Random(seed)
    image, label = _marked_pair()
    img, lab = random_rescale(image, label, (200, 100), (0.6, 1.6), rng=rng)
    img, lab, _ = random_crop(img, lab, (64, 96), cat_max_ratio=1.0, rng=rng)
    if seed % 2:
        img, lab = hflip(img, lab)
    red = (img[..., 0] > 200) & (img[..., 1] < 60)
    marker = lab == 7
    assert set(np.unique(lab)) <= {0, 1, 7}  # nearest neighbour only: no value in between
    assert marker.sum() == 0 or red.sum() > 0
    if marker.sum():
        # the marker label sits on the marker colour (bilinear blurs the image's edge by a pixel)
        assert red[marker].mean() > 0.7
        ys, xs = np.nonzero(marker)
        rys, rxs = np.nonzero(red)
        assert abs(ys.mean() - rys.mean()) < 1.5 and abs(xs.mean() - rxs.mean()) < 1.5


def test_labels_are_never_interpolated():
    label = np.zeros((33, 47), dtype=np.uint8)
    label[::2] = 3
    label[:, ::3] = 9
    for size in ((17, 23), (90, 121)):
        _, out = resize(np.zeros((33, 47, 3), np.uint8), label, size)
        assert out.shape == size and set(np.unique(out)) <= {0, 3, 9}


class CountingRandom(random.Random):
    def __init__(self, seed):
        super().__init__(seed)
        self.crops = 0

    def randint(self, a, b):
        self.crops += 0.5  # two draws (y, x) per crop box
        return super().randint(a, b)


def test_cat_max_ratio_retries_until_no_class_dominates():
    label = np.zeros((100, 100), dtype=np.uint8)
    label[80:, 80:] = 1                       # a small second class in one corner
    label[:5] = 255                           # ignored pixels do not count
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    for seed in range(5):
        rng = CountingRandom(seed)
        _, crop, _ = random_crop(image, label, (30, 30), cat_max_ratio=0.75, rng=rng)
        values, counts = np.unique(crop[crop != 255], return_counts=True)
        if rng.crops < 11:  # accepted before the 10 retries ran out: the crop satisfies the ratio
            assert len(values) > 1 and counts.max() / counts.sum() < 0.75
        assert 1 <= rng.crops <= 11
    rng = CountingRandom(0)
    random_crop(image, label, (30, 30), cat_max_ratio=1.0, rng=rng)
    assert rng.crops == 1
    rng = CountingRandom(0)  # never satisfiable: one crop and ten retries
    random_crop(image, np.zeros((100, 100), np.uint8), (30, 30), cat_max_ratio=0.75, rng=rng)
    assert rng.crops == 11


def test_keep_ratio_rescale_and_padding():
    assert keep_ratio_size(480, 640, (2048, 512)) == (512, 683)
    assert keep_ratio_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert keep_ratio_size(100, 1000, (2048, 512)) == (205, 2048)
    x, y = pad(torch.ones(3, 5, 7), torch.zeros(5, 7, dtype=torch.long), (8, 9))
    assert x.shape == (3, 8, 9) and y.shape == (8, 9)
    assert x[:, 5:].abs().sum() == 0 and x[:, :, 7:].abs().sum() == 0 and x[:, :5, :7].min() == 1
    assert (y[5:] == 255).all() and (y[:, 7:] == 255).all() and (y[:5, :7] == 0).all()


def test_train_transform_output():
    random.seed(0)
    image, label = _marked_pair(60, 80)
    t = SegTrainTransform(crop_size=(64, 64), scale=(80, 60), ratio_range=(0.5, 0.6))
    x, y = t(image, label)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.long
    assert (y == 255).any()  # the resized image is smaller than the crop: padded with ignore
    assert set(y.unique().tolist()) <= {0, 1, 7, 255}


# ---------------------------------------------------------------- loss (§3)

def test_loss_averages_over_all_pixels_with_ignored_ones_as_zeros():
    from loss import SegmentationLoss, pixel_cross_entropy
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 6, 10))
    labels[0, :2] = 255
    up = F.interpolate(logits, size=(6, 10), mode='bilinear', align_corners=False)
    log_p = up.log_softmax(1)
    total, n = 0., 0
    for b in range(2):
        for y in range(6):
            for x in range(10):
                n += 1
                if labels[b, y, x] != 255:
                    total -= float(log_p[b, labels[b, y, x], y, x])
    assert float(pixel_cross_entropy(logits, labels)) == pytest.approx(total / n, rel=1e-5)
    aux = torch.randn(2, 4, 2, 3)
    loss, parts = SegmentationLoss()((logits, aux), labels)
    assert float(loss) == pytest.approx(float(parts['decode']) + 0.4 * float(pixel_cross_entropy(aux, labels)), rel=1e-6)
