"""MindCV interoperability: MindSpore .ckpt files (fixtures written by real MindSpore 2.10 /
MindCV 0.3, see tests/fixtures/make_mindspore_fixtures.py) read without MindSpore, MindCV's names
mapped, MindCV's numerics reproduced (against outputs MindCV computed), and the scripts using them."""
import copy
import json
import math
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models import numerics_kwargs
from models.visformer import Visformer
from tests.mindspore_writer import mindcv_names, write_mindspore_checkpoint
from tests.small_models import small_volo
from utils import CheckpointError, load_pretrained_weights, read_checkpoint
from layers.mindspore_ckpt import (MindSporeCheckpointError, looks_like_mindspore_checkpoint, mindcv_state_dict,
                                  read_mindspore_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
DTYPES = ['float32', 'float16', 'bfloat16', 'float64', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
          'uint32', 'uint64', 'bool']
MINI = {  # the tiny MindCV Visformers of the fixtures, in this repository's arguments
    'visformer_mini': dict(img_size=32, num_classes=10, init_channels=8, stage_dims=(16, 32, 64), patch_sizes=(4, 2, 2),
                           depths=(1, 1, 1), num_heads=(2, 2, 2), attn_stage='011', spatial_conv='100',
                           qk_scale_exponent=-0.25, first_stage=1),
    'visformer_mini_v2': dict(img_size=32, num_classes=10, init_channels=8, stage_dims=(16, 32, 64, 128),
                              patch_sizes=(2, 2, 2, 2), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), attn_stage='0011',
                              spatial_conv='1100', qk_scale_exponent=-0.5, first_stage=0),
}


def fixture(name):
    return os.path.join(FIXTURES, name)


def expected_dtype_values(name):
    i = DTYPES.index(name)
    base = np.arange(6).reshape(2, 3)
    if name == 'bool':
        return ((base + i) % 2).astype(bool).tolist()
    return (base - (0 if name.startswith('uint') else 2) + i).tolist()


# ---------------------------------------------------------------- the file format

@pytest.mark.parametrize('name', ['dtypes.ckpt', 'dtypes_crc.ckpt'])
def test_every_dtype_written_by_mindspore_reads_back(name):
    tensors = read_mindspore_checkpoint(fixture(name))
    assert looks_like_mindspore_checkpoint(fixture(name))
    for dtype in DTYPES:
        t = tensors[f'tensor.{dtype}']
        assert t.dtype == getattr(torch, dtype) and t.shape == (2, 3)
        assert t.to(torch.float64 if dtype != 'bool' else torch.bool).tolist() == expected_dtype_values(dtype)
    assert tensors['scalar.int32'].shape == () and int(tensors['scalar.int32']) == 7
    assert tensors['vector.float32'].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_the_test_writer_produces_mindspores_bytes():
    tensors = read_mindspore_checkpoint(fixture('dtypes_crc.ckpt'))
    ours = write_mindspore_checkpoint(os.path.join(FIXTURES, '..', '..', '.pytest_writer.ckpt'), tensors, crc=True)
    try:
        assert open(ours, 'rb').read() == open(fixture('dtypes_crc.ckpt'), 'rb').read()
    finally:
        os.remove(ours)


def test_a_parameter_split_across_records_is_joined(tmp_path):
    big = torch.arange(4 * 5 * 3, dtype=torch.float32).reshape(4, 5, 3)
    half = torch.randn(7, 3).to(torch.bfloat16)
    path = write_mindspore_checkpoint(tmp_path / 'split.ckpt', {'a': torch.ones(2), 'big': big, 'half': half},
                                      split={'big': 3, 'half': 2})
    tensors = read_mindspore_checkpoint(str(path))
    assert list(tensors) == ['a', 'big', 'half']
    torch.testing.assert_close(tensors['big'], big, rtol=0, atol=0)
    torch.testing.assert_close(tensors['half'], half, rtol=0, atol=0)


@pytest.mark.parametrize('damage,message', [
    ('truncate', 'truncated'), ('flip_crc_payload', 'CRC check failed'), ('random', 'cannot be parsed'),
    ('torch', 'a PyTorch checkpoint'), ('empty', 'is empty'), ('text', 'cannot be parsed')])
def test_damaged_or_foreign_files_are_one_clear_error(tmp_path, damage, message):
    data = open(fixture('dtypes_crc.ckpt'), 'rb').read()
    path = tmp_path / 'bad.ckpt'
    if damage == 'truncate':
        path.write_bytes(open(fixture('dtypes.ckpt'), 'rb').read()[:300])
    elif damage == 'flip_crc_payload':
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:])
    elif damage == 'random':  # what an encrypted file looks like
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == 'torch':
        torch.save({'x': torch.ones(2)}, path)
        with pytest.raises(MindSporeCheckpointError, match=message):
            read_mindspore_checkpoint(str(path))
        return
    elif damage == 'empty':
        path.write_bytes(b'')
    else:
        path.write_text('not a checkpoint at all\n')
    with pytest.raises(MindSporeCheckpointError, match=message) as e:
        read_mindspore_checkpoint(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match=str(path)):  # and through the loader, by the .ckpt name
        load_pretrained_weights(small_volo(), str(path))


def test_records_of_a_split_parameter_that_disagree(tmp_path):
    from layers.mindspore_ckpt import _message_classes
    Checkpoint = _message_classes()
    records = []
    for dims in ((4, 2), (3, 2)):  # two records of one name with different shapes
        msg = Checkpoint()
        value = msg.value.add(tag='w')
        value.tensor.dims.extend(dims)
        value.tensor.tensor_type = 'Float32'
        value.tensor.tensor_content = bytes(16)
        records.append(msg.SerializeToString())
    (tmp_path / 'x.ckpt').write_bytes(b''.join(records))
    with pytest.raises(MindSporeCheckpointError, match='split parameter w disagree'):
        read_mindspore_checkpoint(str(tmp_path / 'x.ckpt'))


# ---------------------------------------------------------------- names

def _model(name, **kwargs):
    with torch.device('meta'):
        return getattr(models, name)(**kwargs)


@pytest.mark.parametrize('name', ['volo_d1', 'volo_d2', 'volo_d3', 'volo_d4', 'visformer_tiny', 'visformer_small',
                                  'visformer_tiny_v2', 'visformer_small_v2'])
def test_mindcv_names_map_strictly_to_ours(name):
    recorded = json.load(open(fixture('mindcv_names.json')))['models'][name]
    mapped = mindcv_state_dict({n: torch.empty(shape, device='meta') for n, shape in recorded}).state_dict
    ours = {k: tuple(v.shape) for k, v in _model(name).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours


def test_training_entries_are_dropped_and_ema_is_selectable(caplog):
    caplog.set_level('INFO')
    model = Visformer(**MINI['visformer_mini'])
    load_pretrained_weights(model, fixture('visformer_mini_train.ckpt'))
    assert 'global_step' in caplog.text and 'optimizer state (adam_m.*)' in caplog.text and 'EMA copy' in caplog.text
    regular = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained_weights(model, fixture('visformer_mini_train.ckpt'), use_ema=True)
    torch.testing.assert_close(model.head.weight, regular['head.weight'] * 0.5)
    torch.testing.assert_close(model.stage2[0].norm2.running_var, regular['stage2.0.norm2.running_var'] * 0.5)


def test_detected_by_content_and_wrong_variant_is_named(tmp_path):
    renamed = tmp_path / 'weights.bin'
    shutil.copy(fixture('volo_mini.ckpt'), renamed)
    model = small_volo(img_size=32, num_classes=10, **numerics_kwargs('volo_d1', 'mindcv'))
    load_pretrained_weights(model, str(renamed))  # strict: every name maps, aux_head left out
    assert read_checkpoint(str(renamed)).numerics == 'mindcv'
    with pytest.raises(CheckpointError, match='looks like an unknown VOLO layout .* but the model is volo_d1'):
        load_pretrained_weights(models.volo_d1(img_size=32, num_classes=10), str(renamed))
    with pytest.raises(CheckpointError, match='unknown Visformer layout'):
        load_pretrained_weights(Visformer(**MINI['visformer_mini']), fixture('visformer_mini_v2.ckpt'))
    # another resolution (position embeddings resized) and another class count (fresh heads, when asked)
    bigger = Visformer(**{**MINI['visformer_mini'], 'img_size': 64, 'num_classes': 5})
    with pytest.raises(CheckpointError, match='10-class classifier and the model 5 classes'):
        load_pretrained_weights(bigger, fixture('visformer_mini.ckpt'))
    load_pretrained_weights(bigger, fixture('visformer_mini.ckpt'), num_classes=5)
    source = read_checkpoint(fixture('visformer_mini.ckpt')).state_dict
    torch.testing.assert_close(bigger.pos_embed3, F.interpolate(source['pos_embed3'], size=(2, 2), mode='bicubic',
                                                                align_corners=False))
    torch.testing.assert_close(bigger.stage3[0].mlp.conv1.weight, source['stage3.0.mlp.conv1.weight'])


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize('name', ['visformer_mini', 'visformer_mini_v2'])
def test_mindcv_numerics_reproduce_mindcv_outputs(name):
    io = np.load(fixture(f'{name}_io.npz'), allow_pickle=False)
    x, theirs = torch.from_numpy(io['input']), torch.from_numpy(io['logits'])
    results = {}
    for numerics in ('mindcv', None):
        model = Visformer(**MINI[name], **numerics_kwargs('visformer_tiny', numerics)).eval()
        load_pretrained_weights(model, fixture(f'{name}.ckpt'))
        with torch.no_grad():
            results[numerics] = (model(x) - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert results['mindcv'] < 1e-4 * scale + 1e-4          # MindCV's own outputs, computed by MindSpore
    assert results[None] > 20 * results['mindcv']            # exact GELU differs measurably


def tanh_gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class TanhGelu(nn.Module):
    def forward(self, x):
        return tanh_gelu(x)


def _recompute(model, x, act):
    """Class-token logits of `model` (its weights) with LayerNorm eps 1e-7 and `act` in every MLP."""
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-7
        if hasattr(m, 'act') and isinstance(m.act, nn.GELU):
            m.act = act
    return reference.head(reference.forward_features(x)[:, 0])


def test_volo_mindcv_numerics_match_a_recomputation():
    torch.manual_seed(0)
    mindcv = small_volo(img_size=32, num_classes=10, **numerics_kwargs('volo_d1', 'mindcv')).eval()
    with torch.no_grad():  # MLP inputs of order one, where the two GELUs differ
        for m in mindcv.modules():
            if hasattr(m, 'fc1'):
                m.fc1.weight.normal_(0, 2 / m.fc1.in_features ** 0.5)
                m.fc1.bias.normal_(0, 0.5)
        mindcv.head.weight.normal_(0, 1)  # logits of order ten, so that differences are not rounding
    default = small_volo(img_size=32, num_classes=10).eval()
    default.load_state_dict(mindcv.state_dict(), strict=False)  # the default also has an aux_head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, plain = mindcv(x), default(x)
        tanh_reference = _recompute(default, x, TanhGelu())
        exact_gelu = _recompute(default, x, nn.GELU())
    torch.testing.assert_close(ours, tanh_reference, rtol=1e-5, atol=1e-5)
    assert (ours - exact_gelu).abs().max() > 1e-3     # the GELU alone changes the logits measurably
    assert ours.abs().max() < 100
    assert (ours - plain).abs().max() > 1e-2          # and the default model (aux head, exact GELU) more
    # training: MindCV's VOLO has no MixToken and returns class-token logits only; gradients flow through
    mindcv.train()
    out = mindcv(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert mindcv.network[0][0].mlp.fc1.weight.grad is not None


def test_tanh_gelu_backward_recomputation_matches_autograd():
    torch.manual_seed(0)
    layer = small_volo(img_size=32, num_classes=10, **numerics_kwargs('volo_d1', 'mindcv')).network[2][0].mlp
    x = torch.randn(4, 5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    F.linear(tanh_gelu(F.linear(ref_x, layer.fc1.weight, layer.fc1.bias)), layer.fc2.weight,
             layer.fc2.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the scripts

@pytest.fixture(scope='module')
def mindcv_visformer(tmp_path_factory):
    """A full-size visformer_tiny with 3 classes in MindCV's names and format, and its model."""
    torch.manual_seed(0)
    model = models.visformer_tiny(num_classes=3, img_size=64).eval()
    with torch.no_grad():  # BN statistics that are not the identity, so the numerics matter
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp('mindcv') / 'visformer_tiny-3cls.ckpt'
    write_mindspore_checkpoint(path, mindcv_names(model), crc=True)
    return str(path), model


def test_validate_builds_mindcv_numerics_from_the_checkpoint(mindcv_visformer, shapes, tmp_path, caplog):
    import validate
    caplog.set_level('INFO')
    path, _ = mindcv_visformer
    rows = validate.main([shapes, '--checkpoint', path, '--model', 'visformer_tiny', '--img-size', '64', '-b', '8',
                          '-j', '0', '--crop-pct', '1.0'])
    assert 'holds mindcv weights: the model is built with their numerics' in caplog.text
    mindcv_model = models.visformer_tiny(num_classes=3, img_size=64, **numerics_kwargs('visformer_tiny', 'mindcv'))
    load_pretrained_weights(mindcv_model, path)
    from data.dataset import ImageFolderDataset
    from timm.data import create_transform
    ds = ImageFolderDataset(os.path.join(shapes, 'val'), transform=create_transform(64, crop_pct=1.0,
                                                                                     interpolation='bicubic'))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        top1 = 100 * (mindcv_model.eval()(xs).argmax(1) == ys).float().mean().item()
    assert rows[0]['top1'] == pytest.approx(top1, abs=1e-3)


def test_finetune_and_initial_checkpoint_accept_mindspore_files(mindcv_visformer, shapes, tmp_path):
    import main as train_script
    path, _ = mindcv_visformer
    args = [shapes, '--model', 'visformer_tiny', '--img-size', '64', '-b', '8', '--epochs', '1', '--warmup-epochs',
            '0', '--cooldown-epochs', '0', '-j', '0', '--aa', '', '--reprob', '0', '--output', str(tmp_path)]
    run = train_script.main(args + ['--finetune', path, '--num-classes', '3'])
    assert os.path.isfile(os.path.join(run, 'last.pth.tar'))
    run = train_script.main(args + ['--initial-checkpoint', path, '--num-classes', '3', '--output', str(tmp_path / 'b')])
    assert os.path.isfile(os.path.join(run, 'last.pth.tar'))


def test_convert_tool(mindcv_visformer, tmp_path, capsys, monkeypatch):
    path, source_model = mindcv_visformer
    out = tmp_path / 'converted.pth.tar'
    monkeypatch.setattr(sys, 'argv', ['convert_mindcv.py', path, str(out), '--model', 'visformer_tiny'])
    with pytest.raises(SystemExit) as exit_info:  # as python -m tools.convert_mindcv runs it
        runpy.run_module('tools.convert_mindcv', run_name='__main__', alter_sys=True)
    stdout = capsys.readouterr().out
    assert exit_info.value.code == 0 and 'tensors mapped' in stdout and 'numerics: mindcv' in stdout
    contents = read_checkpoint(str(out))
    assert contents.numerics == 'mindcv'
    for k, v in source_model.state_dict().items():
        torch.testing.assert_close(contents.state_dict[k], v, rtol=0, atol=0)
    # the same tool as a function: safetensors output, a wrong model
    from tools import convert_mindcv
    st = tmp_path / 'converted.safetensors'
    assert convert_mindcv.main([path, str(st), '--model', 'visformer_tiny']) == 0
    contents = read_checkpoint(str(st))
    assert contents.numerics == 'mindcv' and contents.train_args['model'] == 'visformer_tiny'
    torch.testing.assert_close(contents.state_dict['head.weight'], source_model.head.weight, rtol=0, atol=0)
    assert convert_mindcv.main([path, str(tmp_path / 'w.pth.tar'), '--model', 'visformer_small']) == 2
    assert 'looks like visformer_tiny, but the model is visformer_small' in capsys.readouterr().err
