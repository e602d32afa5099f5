import argparse
import logging
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from utils import CheckpointError, load_pretrained_weights, safe_load


@pytest.fixture(scope='module')
def source():
    torch.manual_seed(0)
    return models.volo_d1(img_size=64, num_classes=10)


def _assert_loaded(model, state, skip=()):
    ours = model.state_dict()
    for k, v in state.items():
        if not k.startswith(skip):
            assert torch.equal(ours[k], v), k


def _reference_training_checkpoint(state, ema):
    """The dict the reference training script writes, argparse.Namespace and NumPy metric included."""
    args = argparse.Namespace(model='volo_d1', img_size=64, lr=1.6e-3, token_label=True, mean=None,
                              input_size=(3, 64, 64), betas=[0.9, 0.999])
    return {'epoch': 3, 'arch': 'volo_d1', 'state_dict': state, 'optimizer': {'state': {}, 'param_groups': []},
            'version': 2, 'args': args, 'amp_scaler': {'scale': 65536.0}, 'state_dict_ema': ema,
            'metric': np.float64(71.5)}


@pytest.mark.parametrize('layout', ['raw', 'state_dict', 'model', 'module', 'namespace', 'ema'])
def test_round_trips(tmp_path, source, layout):
    state = source.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        'raw': state,
        'state_dict': {'state_dict': state, 'epoch': 1},
        'model': {'model': state},
        'module': {'state_dict': {f'module.{k}': v for k, v in state.items()}},
        'namespace': _reference_training_checkpoint(state, ema),
        'ema': _reference_training_checkpoint(state, ema),
    }[layout]
    path = tmp_path / 'ckpt.pth.tar'
    torch.save(payload, path)
    model = models.volo_d1(img_size=64, num_classes=10)
    load_pretrained_weights(model, str(path), use_ema=layout == 'ema')
    _assert_loaded(model, ema if layout == 'ema' else state)


def test_use_ema_without_ema_warns_and_loads_regular(tmp_path, source, caplog):
    path = tmp_path / 'plain.pth.tar'
    torch.save({'state_dict': source.state_dict()}, path)
    model = models.volo_d1(img_size=64, num_classes=10)
    with caplog.at_level(logging.WARNING):
        load_pretrained_weights(model, str(path), use_ema=True)
    assert 'no EMA weights' in caplog.text
    _assert_loaded(model, source.state_dict())


def test_pos_embed_resized_bicubic_and_nothing_else_changes(tmp_path, source):
    path = tmp_path / 'ckpt.pth.tar'
    torch.save(source.state_dict(), path)
    model = models.volo_d1(img_size=96, num_classes=10)
    load_pretrained_weights(model, str(path))
    expected = F.interpolate(source.pos_embed.detach().permute(0, 3, 1, 2), size=(6, 6), mode='bicubic',
                             align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(model.pos_embed, expected, atol=0)
    _assert_loaded(model, source.state_dict(), skip=('pos_embed',))
    wide = models.volo_d1(img_size=(64, 128), num_classes=10)
    load_pretrained_weights(wide, str(path))
    assert wide.pos_embed.shape == (1, 4, 8, 384)
    expected = F.interpolate(source.pos_embed.detach().permute(0, 3, 1, 2), size=(4, 8), mode='bicubic',
                             align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(wide.pos_embed.detach(), expected)
    wide.eval()
    assert wide(torch.randn(1, 3, 64, 128)).shape == (1, 10)


def test_new_class_count_keeps_fresh_heads(tmp_path, source):
    path = tmp_path / 'ckpt.pth.tar'
    torch.save(source.state_dict(), path)
    torch.manual_seed(5)
    model = models.volo_d1(img_size=64, num_classes=3)
    head, aux = model.head.weight.clone(), model.aux_head.weight.clone()
    load_pretrained_weights(model, str(path), num_classes=3)
    assert torch.equal(model.head.weight, head) and torch.equal(model.aux_head.weight, aux)
    _assert_loaded(model, source.state_dict(), skip=('head', 'aux_head'))
    with pytest.raises(ValueError, match='num_classes=5'):
        load_pretrained_weights(model, str(path), num_classes=5)


def test_wrong_variant_is_one_clear_message(tmp_path):
    with torch.device('meta'):
        d5 = models.volo_d5(img_size=64, num_classes=10)
    # stride-0 tensors: the file holds one element per tensor, the shapes are d5's
    state = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in d5.state_dict().items()}
    path = tmp_path / 'd5.pth.tar'
    torch.save(state, path)
    model = models.volo_d2(img_size=64, num_classes=10)
    with pytest.raises(CheckpointError) as err:
        load_pretrained_weights(model, str(path))
    msg = str(err.value)
    assert 'looks like volo_d5' in msg and 'model is volo_d2' in msg
    assert 'patch_embed.conv.0.weight: file (128, 3, 7, 7) vs model (64, 3, 7, 7)' in msg
    assert len(msg) < 600


def test_strict_false_reports_missing_and_unexpected(tmp_path, source, caplog):
    state = dict(source.state_dict())
    del state['norm.weight']
    state['extra.weight'] = torch.zeros(2)
    path = tmp_path / 'partial.pth.tar'
    torch.save(state, path)
    model = models.volo_d1(img_size=64, num_classes=10)
    with pytest.raises(CheckpointError, match='missing in file: norm.weight'):
        load_pretrained_weights(model, str(path))
    with caplog.at_level(logging.WARNING):
        result = load_pretrained_weights(model, str(path), strict=False)
    assert result.missing_keys == ['norm.weight'] and result.unexpected_keys == ['extra.weight']
    assert 'norm.weight' in caplog.text and 'extra.weight' in caplog.text


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, source):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': source.state_dict(), 'hook': _Payload(marker)}, path)
    model = models.volo_d1(img_size=64, num_classes=10)
    with pytest.raises(CheckpointError) as err:
        load_pretrained_weights(model, str(path))
    assert str(path) in str(err.value) and 'refused' in str(err.value)
    assert 'system' in str(err.value)
    assert not marker.exists()


def test_run_directory_and_missing_file(tmp_path, source):
    run = tmp_path / 'run'
    run.mkdir()
    with pytest.raises(CheckpointError, match='model_best.pth.tar'):
        safe_load(str(run))
    torch.save({'state_dict': source.state_dict()}, run / 'last.pth.tar')
    model = models.volo_d1(img_size=64, num_classes=10)
    load_pretrained_weights(model, str(run))
    _assert_loaded(model, source.state_dict())
    with pytest.raises(CheckpointError, match='does not exist'):
        load_pretrained_weights(model, str(tmp_path / 'nope.pth.tar'))


def test_truncated_file_is_a_clear_error(tmp_path, source):
    path = tmp_path / 'cut.pth.tar'
    torch.save(source.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cannot read checkpoint'):
        safe_load(str(path))


def test_other_class_count_with_strict_needs_num_classes(tmp_path, source, caplog):
    """A 10-class file into a 3-class model: an error that says how to ask for fresh heads; with
    num_classes=3 (or strict=False) everything else loads and the heads stay as initialised."""
    path = tmp_path / 'ten.pth.tar'
    torch.save(source.state_dict(), path)
    model = models.volo_d1(img_size=64, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained_weights(model, str(path))
    msg = str(err.value)
    assert '10-class classifier' in msg and 'num_classes=3' in msg and 'num_classes=10' in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    with caplog.at_level(logging.WARNING):
        load_pretrained_weights(model, str(path), strict=False)
    assert '10 classes in the checkpoint, 3 in the model' in caplog.text
    _assert_loaded(model, source.state_dict(), skip=('head', 'aux_head'))
    assert torch.equal(model.head.weight, before['head.weight'])


def test_wrong_variant_message_does_not_mention_classes(tmp_path, caplog):
    """d1 weights into d2 with the same class count: the head widths differ, the class counts do not."""
    d1 = models.volo_d1(img_size=64, num_classes=4)
    path = tmp_path / 'd1.pth.tar'
    torch.save(d1.state_dict(), path)
    with caplog.at_level(logging.INFO):
        with pytest.raises(CheckpointError, match='looks like volo_d1, but the model is volo_d2') as err:
            load_pretrained_weights(models.volo_d2(img_size=64, num_classes=4), str(path))
    assert 'class' not in caplog.text and 'class' not in str(err.value)


def test_damaged_bytes_are_always_a_checkpoint_error(tmp_path):
    """A pickle opcode followed by noise fails inside the weights-only unpickler in many ways
    (IndexError, TypeError, ...); every one is a CheckpointError naming the file."""
    rng = np.random.default_rng(0)
    path = tmp_path / 'noise.pth.tar'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch warns about the odd pickle protocols noise declares
        for size in range(1, 301):
            path.write_bytes(b'\x80' + rng.integers(0, 256, size=size % 97 + 1, dtype=np.uint8).tobytes())
            with pytest.raises(CheckpointError, match='noise.pth.tar'):
                safe_load(str(path))
