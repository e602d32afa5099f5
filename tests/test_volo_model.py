import importlib.util
import math
import os

import pytest
import timm
import torch
import torch.nn as nn

import models
from models import volo
from tests.reference_ops import outlook_attention_reference

# (variant, release resolution) -> exact parameter count; state-dict entries at 224
PARAM_COUNTS = {
    ('volo_d1', 224): 26_632_040, ('volo_d1', 384): 26_777_960,
    ('volo_d2', 224): 58_678_336, ('volo_d2', 384): 58_872_896,
    ('volo_d3', 224): 86_325_072, ('volo_d3', 448): 86_626_128,
    ('volo_d4', 224): 192_961_520, ('volo_d4', 448): 193_413_104,
    ('volo_d5', 224): 295_455_584, ('volo_d5', 448): 295_907_168, ('volo_d5', 512): 296_091_488,
}
ENTRY_COUNTS = {'volo_d1': 260, 'volo_d2': 330, 'volo_d3': 466, 'volo_d4': 466, 'volo_d5': 606}
TIMM_NAMES = {'volo_d1': 'volo_d1_224', 'volo_d2': 'volo_d2_224', 'volo_d3': 'volo_d3_224',
              'volo_d4': 'volo_d4_224', 'volo_d5': 'volo_d5_224'}


def _timm_twin(ours, name, img_size):
    """timm's model holding our weights (built on the meta device: no second random init)."""
    with torch.device('meta'):
        ref = timm.create_model(TIMM_NAMES[name], img_size=img_size, num_classes=ours.num_classes)
    ref.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, strict=True, assign=True)
    return ref


@pytest.mark.parametrize('name,img_size', sorted(PARAM_COUNTS))
def test_parameter_counts(name, img_size):
    with torch.device('meta'):
        model = getattr(models, name)(img_size=img_size)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[(name, img_size)]


@pytest.mark.parametrize('name', sorted(ENTRY_COUNTS))
def test_state_dict_layout(name):
    with torch.device('meta'):
        model = getattr(models, name)()
    sd = model.state_dict()
    assert len(sd) == ENTRY_COUNTS[name]
    cfg = volo.VARIANTS[name]
    d0, d = cfg['embed_dims'][0], cfg['embed_dims'][-1]
    hs = cfg['stem_hidden_dim']
    assert sd['pos_embed'].shape == (1, 14, 14, d)
    assert sd['cls_token'].shape == (1, 1, d)
    assert sd['patch_embed.conv.0.weight'].shape == (hs, 3, 7, 7)
    assert sd['patch_embed.conv.3.weight'].shape == (hs, hs, 3, 3)
    assert 'patch_embed.conv.7.num_batches_tracked' in sd
    assert sd['patch_embed.proj.weight'].shape == (d0, hs, 4, 4)
    assert sd['network.0.0.attn.attn.weight'].shape == (81 * cfg['num_heads'][0], d0)
    assert 'network.0.0.attn.v.bias' not in sd
    assert sd['network.1.proj.weight'].shape == (d, d0, 2, 2)
    assert sd['network.2.0.attn.qkv.weight'].shape == (3 * d, d)
    assert sd['post_network.1.attn.kv.weight'].shape == (2 * d, d)
    assert sd['post_network.1.attn.q.weight'].shape == (d, d)
    assert sd['aux_head.weight'].shape == sd['head.weight'].shape == (1000, d)
    with torch.device('meta'):
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize('name,img_size,batch', [
    ('volo_d1', 224, 2), ('volo_d2', 224, 2), ('volo_d3', 224, 1), ('volo_d4', 96, 2),
    ('volo_d5', 96, 2), ('volo_d1', 384, 1), ('volo_d1', 512, 1)])  # larger grids: D1's (same code as D3's at 448)
def test_eval_parity_with_timm(name, img_size, batch):
    torch.manual_seed(0)
    ours = getattr(models, name)(img_size=img_size).eval()
    ref = _timm_twin(ours, name, img_size).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (batch, 1000)
    assert (a - b).abs().max().item() <= 1e-4


def test_train_parity_with_timm_forward_train_plus_head():
    torch.manual_seed(0)
    ours = models.volo_d1(img_size=64, num_classes=10, mix_token=False).train()
    ref = _timm_twin(ours, 'volo_d1', 64).train()
    x = torch.randn(3, 3, 64, 64)
    cls, aux, box = ours.forward_train(x)
    ref_pooled, ref_aux, _ = ref.forward_train(x)
    # timm's forward_train returns the class token's features: apply the head it forgets
    assert (cls - ref.head(ref_pooled)).abs().max().item() <= 1e-4
    assert (aux - ref_aux).abs().max().item() <= 1e-4
    assert aux.shape == (3, 16, 10) and box == (0, 0, 0, 0)


def test_return_modes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    dense = models.volo_d1(img_size=64, num_classes=7).eval()
    no_dense = models.volo_d1(img_size=64, num_classes=7, return_dense=False, mix_token=False).eval()
    mean = models.volo_d1(img_size=64, num_classes=7, return_mean=True, mix_token=False).eval()
    state = {k: v for k, v in dense.state_dict().items() if not k.startswith('aux_head')}
    no_dense.load_state_dict(state)
    mean.load_state_dict(dense.state_dict())
    with torch.no_grad():
        feats = dense.forward_features(x)
        assert feats.shape == (2, 17, 384)
        cls_only = dense.head(feats[:, 0])
        assert torch.allclose(dense(x), cls_only + 0.5 * dense.aux_head(feats[:, 1:]).max(1)[0], atol=1e-6)
        assert torch.allclose(no_dense(x), cls_only, atol=1e-6)
        assert torch.allclose(mean(x), dense.head(feats.mean(1)), atol=1e-6)
        assert torch.equal(dense.forward_head(feats, pre_logits=True), feats[:, 0])
    no_dense.train()
    assert no_dense(x).shape == (2, 7)  # no dense head: plain logits in training too
    with pytest.raises(ValueError, match='mix_token needs return_dense'):
        models.volo_d1(img_size=64, return_dense=False)


def _manual_mix_forward(model, x, box):
    """MixToken by hand: mix the stem output, run the rest, un-mix the dense logits."""
    s = model.pooling_scale
    r1, c1, r2, c2 = box
    stem = model.patch_embed(x).permute(0, 2, 3, 1)
    mixed = stem.clone()
    mixed[:, r1 * s:r2 * s, c1 * s:c2 * s] = stem.flip(0)[:, r1 * s:r2 * s, c1 * s:c2 * s]
    tokens = model.forward_tokens(mixed)
    cls, aux = model.head(tokens[:, 0]), model.aux_head(tokens[:, 1:])
    gh, gw = stem.shape[1] // s, stem.shape[2] // s
    aux = aux.reshape(x.shape[0], gh, gw, -1)
    unmixed = aux.clone()
    unmixed[:, r1:r2, c1:c2] = aux.flip(0)[:, r1:r2, c1:c2]
    return cls, unmixed.reshape(x.shape[0], gh * gw, -1)


@pytest.mark.parametrize('batch', [1, 3])
def test_mix_token_equals_manual_mix(batch):
    torch.manual_seed(1)
    model = models.volo_d1(img_size=96, num_classes=5).train()
    model.patch_embed.eval()  # keep BN statistics out of the comparison
    x = torch.randn(batch, 3, 96, 96)
    torch.manual_seed(123)
    cls, aux, box = model.forward_train(x)
    r1, c1, r2, c2 = box
    assert 0 <= r1 <= r2 <= 6 and 0 <= c1 <= c2 <= 6
    assert all(isinstance(b, int) for b in box)
    with torch.no_grad():
        ref_cls, ref_aux = _manual_mix_forward(model, x, box)
    assert torch.allclose(cls, ref_cls, atol=1e-5)
    assert torch.allclose(aux, ref_aux, atol=1e-5)
    torch.manual_seed(123)
    assert model.forward_train(x)[2] == box  # reproducible under torch.manual_seed


def test_mix_token_boxes_stay_on_grid_and_vary():
    model = models.volo_d1(img_size=64, num_classes=3).train()
    torch.manual_seed(0)
    boxes = set()
    for _ in range(40):
        lam = float(torch.rand(()))
        box = volo.rand_token_box(4, 4, lam)
        r1, c1, r2, c2 = box
        assert 0 <= r1 <= r2 <= 4 and 0 <= c1 <= c2 <= 4
        boxes.add(box)
    assert len(boxes) > 5
    assert model.mix_token
    # the box of a real forward is on the 4x4 token grid of a 64-px image
    for _ in range(5):
        _, aux, (r1, c1, r2, c2) = model.forward_train(torch.randn(2, 3, 64, 64))
        assert aux.shape == (2, 16, 3) and 0 <= r1 <= r2 <= 4 and 0 <= c1 <= c2 <= 4


def test_rows_first_box_convention():
    """A box with rows 0..1 and all columns must replace the top rows of the stem grid."""
    model = models.volo_d1(img_size=64, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = model.patch_embed.eval()(x).permute(0, 2, 3, 1)
    torch.manual_seed(0)
    seen = []
    original = model.forward_tokens

    def capture(t):
        seen.append(t.detach().clone())
        return original(t)

    model.forward_tokens = capture
    model.train()
    model.patch_embed.eval()
    volo_box = volo.rand_token_box
    try:
        volo.rand_token_box = lambda gh, gw, lam: (0, 0, 1, gw)
        model.forward_train(x)
    finally:
        volo.rand_token_box = volo_box
    mixed = seen[0]
    assert torch.equal(mixed[0, :2], stem[1, :2])  # top two stem rows come from the other image
    assert torch.equal(mixed[0, 2:], stem[0, 2:])


def test_timm_conventions(tmp_path):
    model = timm.create_model('volo_d1', num_classes=10, img_size=384, drop_path_rate=0.1)
    assert isinstance(model, volo.VOLO)
    assert model.pos_embed.shape == (1, 24, 24, 384)
    assert model.default_cfg['input_size'] == (3, 384, 384) and model.default_cfg['crop_pct'] == 1.0
    assert model.pretrained_cfg is model.default_cfg
    assert models.volo_d1().default_cfg['crop_pct'] == 0.96
    with torch.device('meta'):
        assert models.volo_d4(img_size=448).default_cfg['crop_pct'] == 1.15
        assert timm.create_model('volo_d5.sail_in1k_512').pos_embed.shape[1] == 32
    # drop path grows linearly over all blocks and applies to transformer blocks only
    dprs = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.
            for stage in model.network if isinstance(stage, nn.Sequential) for b in stage]
    assert dprs[:4] == [0.] * 4
    assert math.isclose(dprs[-1], 0.1) and math.isclose(dprs[4], 0.1 * 4 / 17)
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    model.reset_classifier(3)
    assert model.head.out_features == model.aux_head.out_features == model.num_classes == 3
    model.eval()
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 3)
    model.reset_classifier(0)
    assert model.forward_head(model.forward_features(torch.randn(1, 3, 384, 384))).shape == (1, 384)
    assert 'volo_d3' in timm.list_models('volo_d*')


def test_bad_image_size():
    with pytest.raises(ValueError, match='multiple of 16'):
        models.volo_d1(img_size=200)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = models.volo_d1(img_size=64, num_classes=4, mix_token=False).train()
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        cls, aux, _ = model.forward_train(x)
        (cls.square().sum() + aux.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g0 = grads()
    model.set_grad_checkpointing(True)
    g1 = grads()
    assert model.grad_checkpointing
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5), n


def test_pretrained_downloads_through_hub_cache(tmp_path, monkeypatch):
    source = models.volo_d1(img_size=224, num_classes=1000)
    release = tmp_path / 'release' / 'd1_224_84.2.pth.tar'
    release.parent.mkdir()
    torch.save(source.state_dict(), release)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    url = release.as_uri()
    model = timm.create_model('volo_d1', pretrained=True, img_size=384, num_classes=10,
                              pretrained_cfg_overlay={'url': url})
    cached = tmp_path / 'hub' / 'hub' / 'checkpoints' / 'd1_224_84.2.pth.tar'
    assert cached.is_file()
    assert model.pos_embed.shape == (1, 24, 24, 384)
    for k, v in source.state_dict().items():
        if not k.startswith(('head', 'aux_head', 'pos_embed')):
            assert torch.equal(model.state_dict()[k], v), k
    # second call uses the cache: the source file can vanish
    os.remove(release)
    again = models.volo_d1(pretrained=True, pretrained_cfg_overlay={'url': url})
    assert torch.equal(again.head.weight, source.head.weight)


GEOMETRIES = [  # (B, H, W, C), kernel, stride, padding, heads: even, odd and non-square maps, batch 1
    ((2, 28, 28, 48), 3, 2, 1, 6), ((1, 27, 27, 32), 3, 2, 1, 4), ((2, 29, 31, 24), 3, 2, 1, 3),
    ((1, 14, 14, 16), 3, 1, 1, 2), ((2, 20, 22, 16), 5, 2, 2, 4), ((1, 9, 11, 8), 1, 1, 0, 1),
    ((2, 15, 12, 12), 3, 3, 0, 2)]
# Triton's interpreter runs every program in Python, one per head and block of pixels: the same geometries
# and parities on smaller maps, with fewer heads past the first two (the variants' head counts run in
# test_outlook_triton.py)
INTERPRETED = [
    ((2, 10, 10, 12), 3, 2, 1, 3), ((1, 15, 15, 16), 3, 2, 1, 2), ((2, 13, 15, 12), 3, 2, 1, 1),
    ((1, 10, 10, 8), 3, 1, 1, 1), ((1, 9, 11, 8), 5, 2, 2, 1), ((1, 9, 11, 8), 1, 1, 0, 1),
    ((2, 15, 12, 12), 3, 3, 0, 2)]
_TRITON = pytest.mark.skipif(importlib.util.find_spec('triton') is None,
                             reason='Triton ships with the Linux CUDA wheels of torch')


@pytest.mark.parametrize('impl,shape,kernel,stride,padding,heads',
                         [('torch', *g) for g in GEOMETRIES]
                         + [pytest.param('triton', *g, marks=_TRITON) for g in INTERPRETED])
def test_outlook_attention_matches_unfold_fold(impl, shape, kernel, stride, padding, heads):
    """Both implementations in fp64; the Triton kernels run in Triton's interpreter here."""
    torch.manual_seed(0)
    module = volo.OutlookAttention(shape[-1], heads, kernel_size=kernel, padding=padding, stride=stride,
                                   outlook_impl=impl).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = module(x)
    ref = outlook_attention_reference(module, x_ref)
    assert (out - ref).abs().max().item() < 1e-10
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(module.parameters()), g)
    grads_ref = torch.autograd.grad(ref, [x_ref] + list(module.parameters()), g)
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max().item() < 1e-10
    with torch.no_grad():
        assert (module(x) - ref).abs().max().item() < 1e-10


def test_outlook_attention_fp32_tolerance_and_double_backward():
    torch.manual_seed(0)
    module = volo.OutlookAttention(48, 6, 3, 1, 2)
    x = torch.randn(2, 28, 28, 48, requires_grad=True)
    out, ref = module(x), outlook_attention_reference(module, x)
    assert (out - ref).abs().max().item() <= 1e-5
    gx, = torch.autograd.grad(out, x, torch.ones_like(out))
    gx_ref, = torch.autograd.grad(ref, x, torch.ones_like(ref))
    assert (gx - gx_ref).abs().max().item() <= 1e-5
    small = volo.OutlookAttention(4, 2, 3, 1, 2).double()
    xs = torch.randn(1, 5, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: small(t), (xs,))


def test_outlook_attention_rejects_inconsistent_geometry():
    module = volo.OutlookAttention(8, 2, kernel_size=3, padding=0, stride=2)
    with pytest.raises(ValueError, match='needs as many windows'):
        module(torch.randn(1, 8, 8, 8))


def test_lean_mlp_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    mlp = volo.Mlp(8, 24).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    ref = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *mlp.parameters()], g),
                    torch.autograd.grad(ref, [x, *mlp.parameters()], g)):
        assert torch.allclose(a, b, atol=1e-10)
    # under CPU bf16 autocast the gradients keep the parameters' dtype
    mlp = volo.Mlp(8, 24)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = mlp(torch.randn(2, 4, 8, requires_grad=True))
    y.float().sum().backward()
    assert mlp.fc1.weight.grad.dtype == mlp.fc2.weight.grad.dtype == torch.float32
    assert torch.isfinite(mlp.fc2.weight.grad).all()
