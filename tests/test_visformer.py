import glob
import json
import os
import warnings

import pytest
import timm
import torch
from timm.models import visformer as timm_visformer

import main as train_script
import models
import validate as validate_script
from models import visformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = {'visformer_tiny': 10_321_368, 'visformer_small': 40_219_592}
# MindCV's reported sizes for the v2 models (not in timm); ours must be within 2%
ZOO_PARAMS = {'visformer_tiny_v2': 9.38e6, 'visformer_small_v2': 23.52e6}
EXACT_V2 = {'visformer_tiny_v2': 9_371_056, 'visformer_small_v2': 23_492_168}


def _calibrate_bn(model, x):
    """Set BatchNorm running statistics from a batch, so eval outputs have realistic magnitudes."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_v1_parity_with_timm(name):
    torch.manual_seed(0)
    ours = _calibrate_bn(getattr(models, name)(), torch.randn(8, 3, 224, 224))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = getattr(timm_visformer, name)().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # identical keys and shapes
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in ours.parameters()) == PARAMS[name]
    assert len(ours.state_dict()) == 205


@pytest.mark.parametrize('name', sorted(ZOO_PARAMS))
def test_v2_size_and_layout(name):
    model = getattr(models, name)()
    count = sum(p.numel() for p in model.parameters())
    assert count == EXACT_V2[name]
    assert abs(count - ZOO_PARAMS[name]) / ZOO_PARAMS[name] < 0.02
    sd = model.state_dict()
    assert sd['pos_embed0'].shape[-1] == 56 and sd['pos_embed3'].shape[-1] == 7
    assert 'stage0.0.mlp.conv2.weight' in sd and 'stage0.0.attn.qkv.weight' not in sd
    assert 'stage2.0.attn.qkv.weight' in sd and 'stage2.0.mlp.conv2.weight' not in sd
    heads = visformer.VARIANTS[name]['num_heads']
    assert model.stage3[0].attn.num_heads == heads[3] and model.stage2[0].attn.num_heads == heads[2]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_split_qk_scaling():
    v1 = models.visformer_tiny().stage2[0].attn
    v2 = models.visformer_tiny_v2().stage2[0].attn
    assert v1.qk_scale == pytest.approx(64 ** -0.25)  # head_dim 64
    assert v2.qk_scale == pytest.approx(32 ** -0.5)  # head_dim 32
    # the split scaling equals one head_dim ** (2 * exponent) scale on the logits
    torch.manual_seed(0)
    x = torch.randn(2, 192, 5, 5)
    q, k, v = v1.qkv(x).reshape(2, 3, 3, 64, 25).permute(1, 0, 2, 4, 3)
    attn = (q @ k.transpose(-1, -2) * 64 ** -0.5).softmax(-1)
    expected = v1.proj((attn @ v).permute(0, 1, 3, 2).reshape(2, 192, 5, 5))
    assert torch.allclose(v1(x), expected, atol=1e-5)
    # fp16 logits stay finite where an unsplit q @ k would overflow
    big = torch.full((1, 1, 4, 64), 60.)
    assert torch.isinf((big.half() @ big.half().transpose(-1, -2))).any()
    assert torch.isfinite((big * v1.qk_scale).half() @ (big * v1.qk_scale).half().transpose(-1, -2)).all()


def test_timm_conventions(tmp_path):
    model = timm.create_model('visformer_small_v2', num_classes=7, drop_path_rate=0.1)
    assert isinstance(model, visformer.Visformer)
    assert model.default_cfg['crop_pct'] == 0.9 and model.default_cfg['interpolation'] == 'bicubic'
    assert model.no_weight_decay() == {'pos_embed0', 'pos_embed1', 'pos_embed2', 'pos_embed3'}
    assert model.stage3[-1].drop_path.drop_prob == pytest.approx(0.1)
    model.reset_classifier(3)
    model.eval()
    feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 512, 7, 7)
    assert model.forward_head(feats).shape == (1, 3)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 512)
    model.set_grad_checkpointing()
    model.train()
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    # community weights for v1 load through the same files, here a local one
    source = models.visformer_tiny()
    path = tmp_path / 'visformer_tiny.pth'
    torch.save(source.state_dict(), path)
    loaded = timm.create_model('visformer_tiny', pretrained=True, pretrained_cfg_overlay={'file': str(path)})
    assert torch.equal(loaded.pos_embed2, source.pos_embed2)


def test_train_with_mixup_then_validate(shapes, tmp_path, caplog):
    argv = [shapes, '--model', 'visformer_tiny', '--img-size', '64', '-b', '8', '--epochs', '2', '--warmup-epochs', '0',
            '--cooldown-epochs', '0', '--lr', '5e-4', '-j', '0', '--mixup', '0.8', '--cutmix', '1.0', '--aa', 'original',
            '--reprob', '0.25', '--drop-path', '0.03', '--output', str(tmp_path)]
    run = train_script.main(argv)
    ckpt = os.path.join(run, 'model_best.pth.tar')
    assert os.path.isfile(ckpt)
    results = tmp_path / 'v.json'
    validate_script.main([shapes, '--model', 'visformer_tiny', '--checkpoint', ckpt, '--img-size', '64', '-j', '0',
                          '--results-file', str(results)])
    got = json.loads(results.read_text())
    assert got['img_size'] == 64 and got['crop_pct'] == 0.9
    # the metrics computed here: the checkpoint's weights on the validation images at 64 px, crop 0.9
    from timm.data import create_transform
    from data.dataset import ImageFolderDataset
    model = models.visformer_tiny(img_size=64, num_classes=3)
    model.load_state_dict(torch.load(ckpt, weights_only=False)['state_dict'])
    val = ImageFolderDataset(os.path.join(shapes, 'val'),
                             transform=create_transform(64, is_training=False, crop_pct=0.9, interpolation='bicubic'))
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model.eval()(images)
    assert got['num_images'] == len(targets) == 12
    assert got['top1'] == pytest.approx(100. * (logits.argmax(1) == targets).float().mean().item(), abs=1e-3)
    assert got['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)
    with pytest.raises(SystemExit):
        train_script.cli(argv + ['--token-label'])
    assert 'needs a model with a dense (token) head' in caplog.text


@pytest.mark.parametrize('config', sorted(glob.glob(os.path.join(REPO, 'configs', 'visformer', '*.yaml'))))
def test_recipes(config):
    args = train_script.parse_args(['/data', '-c', config])
    assert args.model == os.path.basename(config)[:-5]
    assert (args.opt, args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (
        'adamw', 0.8, 1.0, 0.1, 0.25, 'original')
    assert args.batch_size * 8 == 1024 and not args.token_label
    tiny_v2 = args.model == 'visformer_tiny_v2'
    assert (args.epochs, args.lr) == ((400, 1e-3) if tiny_v2 else (300, 5e-4))
    assert args.drop_path == (0.03 if 'tiny' in args.model else 0.1)
