"""The models behave as timm models: the conventions of timm's own model tests (forward, backward,
default cfgs, features, FX, TorchScript) for every registered model, the pretrained registry
before and after `import models`, pretrained loading offline, and torch.hub."""
import math
import os
import warnings

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_notrace_functions, get_notrace_modules, get_pretrained_cfg
from timm.models import visformer as timm_visformer
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import models
from models import visformer, volo
from tests.fresh_interpreter import fresh_import_report
from tests.mindspore_writer import mindcv_names, write_mindspore_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = sorted(models.MINDCV_MODELS)  # every classification model the repository registers
SIZE = 64  # the smallest input every family takes (VOLO: multiples of 16, Visformer: of 32)
NUM_CLASSES = 42
GRAPHED = ['volo_d1', 'visformer_tiny', 'visformer_tiny_v2']  # one registered model per code path
# the numbers on real tensors: the same code paths, VOLO's through volo_test (tests/small_models.py: every
# block type of VOLO-D1, one per stage)
NUMERIC = ['volo_test', 'visformer_tiny', 'visformer_tiny_v2']


def build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=SIZE, **kwargs)


def images(batch=2):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def fx_model(model, train=False):
    """timm's FX feature extractor (its notrace lists) returning the model's output node."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


# ---------------------------------------------------------------- timm's model-test conventions
# Every registered model on the meta device (shapes, graphs and scripts without the cost of the big
# variants' weights); the numbers on real tensors for each code path: VOLO, Visformer v1 and v2.

@pytest.mark.parametrize('name', MODELS)
def test_conventions_of_every_model(name):
    with torch.device('meta'):
        model = build(name, num_classes=NUM_CLASSES)
        x = torch.empty(2, 3, SIZE, SIZE)
        cfg = model.pretrained_cfg
        assert model.default_cfg is cfg and cfg['architecture'] == name and cfg['input_size'] == (3, SIZE, SIZE)
        assert cfg['fixed_input_size'] and cfg['num_classes'] == 1000 and cfg['crop_pct'] != 0.875
        state = model.state_dict()
        classifiers = cfg['classifier'] if isinstance(cfg['classifier'], tuple) else (cfg['classifier'],)
        assert all(f'{c}.weight' in state for c in classifiers) and f'{cfg["first_conv"]}.weight' in state
        assert model.num_features == model.head_hidden_size > 0

        assert model.train()(x).shape == (2, NUM_CLASSES)  # logits in train mode too, as timm's VOLO gives
        model.eval()
        feats = model.forward_features(x)
        grid = SIZE // (16 if name.startswith('volo') else 32)
        assert feats.shape == ((2, 1 + grid ** 2, model.num_features) if name.startswith('volo') else
                               (2, model.num_features, grid, grid))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert [m.shape[1] for m in maps] == [i['num_chs'] for i in model.feature_info]
        assert [SIZE // m.shape[-1] for m in maps] == [i['reduction'] for i in model.feature_info]

        # graphs: torch.fx (no notrace lists needed) and TorchScript, once per code path (the variants of a
        # family differ in depth and width only; timm's own tests leave its big models out of these too)
        if name in GRAPHED:
            assert torch.fx.symbolic_trace(model)(x).shape == (2, NUM_CLASSES)
            assert torch.jit.script(model)(x).shape == (2, NUM_CLASSES)

        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == (2, model.head_hidden_size)

        features = build(name, features_only=True, feature_cls='getter')
        assert type(features).__name__ == 'FeatureGetterNet'
        assert [m.shape for m in features(x)] == [m.shape for m in maps]
        # the wrapper keeps the model's evaluation settings (timm's fallback crop is 0.875)
        assert resolve_data_config(model=features)['crop_pct'] == cfg['crop_pct']


@pytest.mark.parametrize('name', NUMERIC)
def test_forward_backward_heads_and_features(name):
    model = build(name, num_classes=NUM_CLASSES)
    model.train()
    out = model(images())
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    x = images(1)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        final, maps = model.forward_intermediates(x)
        assert torch.allclose(final, feats, atol=1e-6)
        family = volo if name.startswith('volo') else visformer
        features = build(name, features_only=True).eval()  # timm's default feature class: the getter
        assert type(features).__name__ == 'FeatureGetterNet'
        features.model.load_state_dict(family.checkpoint_filter_fn(model.state_dict(), features.model))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(features(x), maps))
        last = build(name, features_only=True, out_indices=(-1,)).eval()
        last.model.load_state_dict(family.checkpoint_filter_fn(model.state_dict(), last.model))
        only, = last(x)
        assert last.feature_info.channels() == [model.num_features] and torch.allclose(only, maps[-1], atol=1e-5)
        model.reset_classifier(0)  # without a classifier: exactly the pre-logits features
        assert torch.equal(model(x), pre)
    unpooled = build(name, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert unpooled.global_pool == '' and unpooled(x).ndim == 3 + (not name.startswith('volo'))
    with pytest.raises(ValueError, match='global_pool'):
        timm.create_model(name, img_size=SIZE, global_pool='max')


@pytest.mark.parametrize('name', NUMERIC)
def test_fx_outputs_and_gradients_equal_eager(name):
    model = build(name, num_classes=NUM_CLASSES).eval()
    x = images()
    with torch.inference_mode():
        eager = model(x)
        assert torch.equal(next(iter(fx_model(model)(x).values())), eager)
        plain = create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])
        assert torch.equal(next(iter(plain(x).values())), eager)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), eager)
        # an FX graph scripted afterwards (timm's FX + TorchScript test): the wrapped calls script too
        scripted_graph = torch.jit.script(fx_model(model))
        assert (next(iter(scripted_graph(x).values())) - eager).abs().max().item() <= 1e-5
    model.train()
    traced = fx_model(model, train=True)
    out = next(iter(traced(x).values()))
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-6)  # BatchNorm in train mode: the same batch statistics
    out.mean().backward()
    assert all(p.grad is not None for p in traced.parameters())
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', NUMERIC)
def test_torchscript_matches_eager(name):
    model = build(name, num_classes=NUM_CLASSES).eval()
    scripted = torch.jit.script(model)
    x = images()
    with torch.no_grad():
        assert (scripted(x) - model(x)).abs().max().item() <= 1e-5
    # train mode (no dropout here): the plain path's logits and gradients
    model.train(), scripted.train()
    out, ref = scripted(x), model(x)
    assert (out - ref).abs().max().item() <= 1e-5
    out.square().mean().backward()
    ref.square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), scripted.parameters()):
        assert (q.grad - p.grad).abs().max().item() <= 1e-4 * max(p.grad.abs().max().item(), 1e-3), n


def test_scripting_keeps_the_fused_paths_out_of_eager():
    """Eager training still takes the GELU-recomputing MLP and the custom outlook functions; only
    the scripted graph is plain."""
    model = build('volo_d1', num_classes=3).train()
    calls = []
    original = volo._GeluLinear.apply
    volo._GeluLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        model(images()).sum().backward()
    finally:
        volo._GeluLinear.apply = original
    assert calls
    graph = str(torch.jit.script(model).graph)
    assert '_GeluLinear' not in graph and 'apply_outlook_attention' not in graph


def test_volo_train_mode_returns_logits_and_forward_train_the_triple():
    model = build('volo_d1', num_classes=5).train()
    model.patch_embed.eval()
    x = images()
    torch.manual_seed(3)
    cls, aux, box = model.forward_train(x)
    assert cls.shape == (2, 5) and aux.shape == (2, (SIZE // 16) ** 2, 5) and len(box) == 4
    model.eval()
    with torch.no_grad():
        eval_logits = model(x)
    model.train()
    model.patch_embed.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), eval_logits, atol=1e-5)  # no MixToken, no tuple
    wrapped = models.DenseTrainingForward(model)
    torch.manual_seed(3)
    again = wrapped(x)
    assert isinstance(again, tuple) and again[2] == box and torch.allclose(again[0], cls, atol=1e-6)
    with pytest.raises(ValueError, match='use model'):
        timm.create_model('volo_d1', img_size=SIZE, return_dense=False, mix_token=False).forward_train(x)


# ---------------------------------------------------------------- the pretrained registry

def test_import_replaces_timms_two_visformer_entries_and_nothing_else():
    """What docs/timm.md says: after `import models`, timm's visformer_tiny / visformer_small build this
    repository's class, and timm's own module still builds timm's."""
    from timm.models import visformer as timm_visformer
    for name in ('visformer_tiny', 'visformer_small'):
        assert type(timm.create_model(name, pretrained=False)) is visformer.Visformer
        assert timm.models.get_arch_name(name) == name and timm.models.is_model(name)
    assert type(timm_visformer.visformer_tiny()) is not visformer.Visformer
    assert type(timm.create_model('volo_d1_224')) is not models.VOLO  # timm's own VOLO names stay timm's


def test_import_keeps_timms_tags_and_adds_ours_without_warnings():
    seen = fresh_import_report()  # a fresh interpreter: timm first, then `import models` with warnings as errors
    assert seen['before'] == ['visformer_small.in1k', 'visformer_tiny.in1k']
    assert set(seen['before']) <= set(seen['after'])
    assert set(seen['after']) - set(seen['before']) == {
        'visformer_tiny.mindcv_in1k', 'visformer_small.mindcv_in1k', 'visformer_tiny_v2.mindcv_in1k',
        'visformer_small_v2.mindcv_in1k'}
    assert seen['hub'] == 'timm/visformer_small.in1k' and seen['same_cfg']  # timm's tag, timm's settings
    releases = {f'{v}.{volo.release_tag(res)}' for v, sizes in volo.RELEASES.items() for res in sizes}
    assert set(seen['volo']) == releases and len(releases) == 11
    assert seen['modules'] == {m: 'volo' if m.startswith('volo') else 'visformer' for m in models.MINDCV_MODELS}


@pytest.mark.parametrize('name,res,file,crop', [
    ('volo_d1', 224, 'd1_224_84.2.pth.tar', 0.96), ('volo_d1', 384, 'd1_384_85.2.pth.tar', 1.0),
    ('volo_d2', 384, 'd2_384_86.0.pth.tar', 1.0), ('volo_d3', 448, 'd3_448_86.3.pth.tar', 1.0),
    ('volo_d4', 448, 'd4_448_86.79.pth.tar', 1.15), ('volo_d5', 512, 'd5_512_87.07.pth.tar', 1.15)])
def test_volo_release_cfgs(name, res, file, crop):
    cfg = get_pretrained_cfg(f'{name}.{volo.release_tag(res)}')
    assert cfg.url == f'https://github.com/sail-sg/volo/releases/download/volo_1/{file}'
    assert cfg.hf_hub_id == f'timm/{name}_{res}.sail_in1k'  # timm's copy of the same file
    assert cfg.input_size == (3, res, res) and cfg.crop_pct == crop and cfg.interpolation == 'bicubic'
    assert cfg.classifier == ('head', 'aux_head') and cfg.first_conv == 'patch_embed.conv.0'
    # timm's own entry for the same weights agrees on everything but the name
    theirs = get_pretrained_cfg(f'{name}_{res}.sail_in1k')
    assert (theirs.url, theirs.hf_hub_id, theirs.input_size, theirs.crop_pct) == (
        cfg.url, cfg.hf_hub_id, cfg.input_size, cfg.crop_pct)


def test_volo_pretrained_from_a_local_file_by_tag_and_by_size(tmp_path):
    source = volo.volo_d1(img_size=384)
    path = tmp_path / 'd1_384_85.2.pth.tar'
    torch.save({'state_dict': source.state_dict()}, path)
    for kwargs in (dict(model_name='volo_d1.sail_in1k_384'), dict(model_name='volo_d1', img_size=384),
                   dict(model_name='volo_d1', img_size=352)):
        model = timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        assert model.pretrained_cfg['tag'] == 'sail_in1k_384' and model.pretrained_cfg['crop_pct'] == 1.0
        assert torch.equal(model.network[0][0].attn.v.weight, source.network[0][0].attn.v.weight)
        side = kwargs.get('img_size', 384)
        assert model.pos_embed.shape == (1, side // 16, side // 16, 384)
        assert model.pretrained_cfg['input_size'] == (3, side, side)
    # the old spelling of the 224 tag still works; an unknown tag is named
    with torch.device('meta'):
        assert timm.create_model('volo_d1.sail_in1k_224').pretrained_cfg['tag'] == 'sail_in1k'
    with pytest.raises(ValueError, match="no release tag 'sail_in1k_999'"):
        timm.create_model('volo_d1.sail_in1k_999')
    features = timm.create_model('volo_d1', pretrained=True, features_only=True, img_size=384,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert features.pretrained_cfg['input_size'] == (3, 384, 384)


def test_timms_own_visformer_weights_load_into_ours(tmp_path):
    """After `import models`, timm's visformer tags build this repository's model, and a file of
    timm's own Visformer (the weights its tag points to) loads into it with the same outputs."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs = timm_visformer.visformer_tiny().eval()  # timm's class, timm's weights layout
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / 'model.safetensors'
    from safetensors.torch import save_file
    save_file(theirs.state_dict(), str(path))
    ours = timm.create_model('visformer_tiny.in1k', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert isinstance(ours, visformer.Visformer) and ours.pretrained_cfg['hf_hub_id'] == 'timm/visformer_tiny.in1k'
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out, ref = ours.eval()(x), theirs(x)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()  # float reassociation only


@pytest.mark.parametrize('source', ['file', 'url'])
def test_mindcv_v2_weights_load_with_their_numerics(source, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trained = visformer.visformer_tiny_v2(num_classes=1000, **visformer.MINDCV_NUMERICS)
    path = write_mindspore_checkpoint(str(tmp_path / 'visformer_tiny_v2-6711a758.ckpt'), mindcv_names(trained))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    where = dict(file=path) if source == 'file' else dict(url=f'file://{path}')
    model = timm.create_model('visformer_tiny_v2', pretrained=True,
                              pretrained_cfg_overlay=dict(where, custom_load=True))
    assert model.pretrained_cfg['tag'] == 'mindcv_in1k'
    assert model.stage2[0].mlp.act1.approximate == 'tanh'  # MindSpore's GELU
    for k, v in trained.state_dict().items():
        if not k.endswith('num_batches_tracked'):
            assert torch.equal(model.state_dict()[k], v), k
    if source == 'url':
        assert (tmp_path / 'hub' / 'hub' / 'checkpoints' / os.path.basename(path)).is_file()
    # another class count: the backbone loads, the head stays as initialised
    five = timm.create_model('visformer_tiny_v2', pretrained=True, num_classes=5,
                             pretrained_cfg_overlay=dict(file=path, custom_load=True))
    assert five.head.out_features == 5 and torch.equal(five.stem[0].weight, trained.stem[0].weight)
    assert get_pretrained_cfg('visformer_small_v2.mindcv_in1k').url == (
        'https://download.mindspore.cn/toolkits/mindcv/visformer/visformer_small_v2-63674ade.ckpt')
    # a file of another model is refused by name
    wrong = write_mindspore_checkpoint(str(tmp_path / 'other.ckpt'), mindcv_names(visformer.visformer_tiny()))
    with pytest.raises(ValueError, match='not the weights of this Visformer'):
        timm.create_model('visformer_tiny_v2', pretrained=True, pretrained_cfg_overlay=dict(file=wrong, custom_load=True))


# ---------------------------------------------------------------- torch.hub

def test_torch_hub_lists_and_loads_locally(tmp_path):
    # what torch.hub.list('OWNER/REPO') lists: hubconf's public callables
    import importlib.util
    spec = importlib.util.spec_from_file_location('hubconf_under_test', os.path.join(REPO, 'hubconf.py'))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith('_')}
    assert hubconf.dependencies == ['torch', 'timm']
    assert entries == set(MODELS) | {f'upernet_{name}' for name in MODELS}
    source = volo.volo_d1()
    path = tmp_path / 'd1_224_84.2.pth.tar'
    torch.save(source.state_dict(), path)
    model = torch.hub.load(REPO, 'volo_d1', source='local', pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.head.weight, source.head.weight)
    segmentor = torch.hub.load(REPO, 'upernet_volo_d1', source='local', pretrained=True, num_classes=7,
                               img_size=128, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(segmentor.backbone.network[0][0].mlp.fc1.weight, source.network[0][0].mlp.fc1.weight)
    assert segmentor.backbone.pos_embed.shape == (1, 8, 8, 384)  # resized from the 224 release
    with torch.no_grad():
        assert segmentor.eval()(torch.randn(1, 3, 128, 128)).shape == (1, 7, 128, 128)
    assert math.isfinite(float(segmentor.decode_head.conv_seg.weight.sum()))
