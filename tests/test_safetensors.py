"""safetensors: export (tools/export_weights.py) and loading everywhere a checkpoint is read, with
no pickle involved."""
import argparse
import os

import pytest
import torch
from safetensors import safe_open

import models
from tests.training_runs import run_fast
from tools import export_weights
from utils import CheckpointError, load_pretrained_weights, read_checkpoint

CLASSES = ['class_0_ellipse', 'class_1_rectangle', 'class_2_triangle']  # the shapes fixture's


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A training-style checkpoint of volo_d1 at 32 px with 3 classes, EMA weights included."""
    torch.manual_seed(0)
    model = models.volo_d1(img_size=32, num_classes=3)
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp('st') / 'last.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'state_dict_ema': ema, 'epoch': 3, 'version': 2,
                'args': argparse.Namespace(model='volo_d1', img_size=32, num_classes=3),
                'class_names': CLASSES}, path)
    return str(path), model


def test_export_and_load_round_trip(checkpoint, tmp_path):
    path, model = checkpoint
    out = str(tmp_path / 'w.safetensors')
    assert export_weights.main([path, out]) == 0
    with safe_open(out, framework='pt') as f:
        meta = f.metadata()
    assert (meta['model'], meta['img_size'], meta['num_classes']) == ('volo_d1', '32', '3')
    fresh = models.volo_d1(img_size=32, num_classes=3)
    load_pretrained_weights(fresh, out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    contents = read_checkpoint(out)
    assert contents.train_args == {'model': 'volo_d1', 'img_size': 32, 'num_classes': 3}
    assert contents.class_names == CLASSES
    # the EMA weights, when asked
    ema_out = str(tmp_path / 'ema.safetensors')
    assert export_weights.main([path, ema_out, '--use-ema']) == 0
    torch.testing.assert_close(read_checkpoint(ema_out).state_dict['head.weight'], model.head.weight * 0.5)
    # another resolution: pos_embed resized as for any checkpoint
    load_pretrained_weights(models.volo_d1(img_size=64, num_classes=3), out)


class RunsCode:
    def __reduce__(self):
        return (os.system, ('touch PWNED_BY_SAFETENSORS_TEST',))


def test_a_pickle_named_safetensors_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / 'evil.safetensors'
    torch.save({'state_dict': {'x': torch.ones(1)}, 'payload': RunsCode()}, bad)
    with pytest.raises(CheckpointError, match='is named .safetensors but is not a safetensors file'):
        load_pretrained_weights(models.volo_d1(img_size=32, num_classes=3), str(bad))
    assert not (tmp_path / 'PWNED_BY_SAFETENSORS_TEST').exists()
    (tmp_path / 'broken.safetensors').write_bytes((64).to_bytes(8, 'little') + b'{"x": [')
    with pytest.raises(CheckpointError, match='broken.safetensors'):
        read_checkpoint(str(tmp_path / 'broken.safetensors'))


def test_wrong_variant_is_named(tmp_path):
    d2 = tmp_path / 'd2.pth'
    torch.save(models.volo_d2(img_size=32, num_classes=3).state_dict(), d2)
    out = str(tmp_path / 'd2.safetensors')
    assert export_weights.main([str(d2), out, '--model', 'volo_d2', '--img-size', '32']) == 0
    with pytest.raises(CheckpointError, match='looks like volo_d2, but the model is volo_d1'):
        load_pretrained_weights(models.volo_d1(img_size=32, num_classes=3), out)


def test_validate_finetune_and_initial_checkpoint_read_safetensors(checkpoint, shapes, tmp_path):
    import validate
    path, _ = checkpoint
    out = str(tmp_path / 'w.safetensors')
    export_weights.main([path, out])
    from_pth = validate.main([shapes, '--checkpoint', path, '-b', '8', '-j', '0'])[0]
    from_st = validate.main([shapes, '--checkpoint', out, '-b', '8', '-j', '0'])[0]
    assert (from_st['model'], from_st['img_size']) == ('volo_d1', 32)  # from the metadata
    assert from_st['top1'] == from_pth['top1'] and from_st['loss'] == pytest.approx(from_pth['loss'])
    run = run_fast(shapes, tmp_path / 'a', '--model', 'volo_d1', '--epochs', '1', '--initial-checkpoint', out,
                   '--num-classes', '3')
    assert os.path.isfile(os.path.join(run, 'last.pth.tar'))
    run = run_fast(shapes, tmp_path / 'b', '--model', 'volo_d1', '--epochs', '1', '--finetune', out, '--num-classes', '3')
    assert os.path.isfile(os.path.join(run, 'last.pth.tar'))


@pytest.mark.parametrize('name', ['volo_d1', 'visformer_tiny'])
def test_hub_folders_round_trip_through_timm(name, tmp_path):
    """timm's save_for_hf writes what push_to_hf_hub uploads (config.json + model.safetensors);
    timm.create_model('local-dir:...') reads it the way 'hf-hub:...' reads a downloaded repo."""
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, img_size=64).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(loaded) is type(model) and loaded.pretrained_cfg['input_size'] == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
