"""tools/visualize.py: the maps are the model's own (shapes, sums, the attention weights reproduce
their blocks' outputs, the class activation map is Grad-CAM computed here by hand), a model trained
here finds its object where it is, and the command writes pictures that decode."""
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import models
from data.synthetic import object_scenes
from models.volo import VOLO
from tools import doc_pictures, visualize


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return models.volo_d1(img_size=64, num_classes=4).eval()


def test_outlook_window_weights_are_distributions_on_the_pooled_grid(model):
    image = torch.randn(3, 64, 96)
    weights, pixels_per_cell = visualize.outlook_window_weights(model, image, (0, 1))
    assert weights.shape == (4, 6, 6, 9, 9)  # 64x96 at stride 8 = 8x12 cells, pooled by 2; 6 heads; 3x3 windows
    assert pixels_per_cell == 8
    assert torch.allclose(weights.sum(-1), torch.ones(4, 6, 6, 9)) and (weights >= 0).all()
    with pytest.raises(ValueError, match='not an outlooker block'):
        visualize.outlook_window_weights(model, image, (2, 0))


def test_class_attention_sums_to_one_and_reproduces_the_block(model):
    image = torch.randn(3, 64, 64)
    maps, grid = visualize.class_attention(model, image)
    assert len(maps) == 2 and grid == (4, 4)
    for attention in maps:
        assert attention.shape == (12, 17) and torch.allclose(attention.sum(-1), torch.ones(12))
    # the weights are the block's: attention @ v through proj equals the block's own output
    block = model.post_network[0].attn
    captured = visualize._capture_inputs(model, type(block), lambda: model(image[None]))
    x = next(x for m, x in captured if m is block)
    with torch.no_grad():
        _, v = block.kv(x).reshape(1, 17, 2, block.num_heads, block.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        rebuilt = block.proj((maps[0][None, :, None] @ v).transpose(1, 2).reshape(1, 1, -1))
        assert torch.allclose(rebuilt, block(x), atol=1e-5)


def _final_features(net, image):
    """The output of the model's final norm for one image (grad-enabled): the tokens (1, 1 + N, C) of
    a VOLO, the map (1, C, H, W) of a Visformer, recorded by a hook on that module."""
    saved = {}
    hook = net.norm.register_forward_hook(lambda module, inputs, output: saved.update(out=output))
    try:
        net(image[None])
    finally:
        hook.remove()
    return saved['out']


def _logits_by_hand(net, features):
    """The class logits written out from the heads' weights: VOLO's head on the class token plus half
    the tokens' best aux_head logit per class; Visformer's head on the map's mean."""
    if isinstance(net, VOLO):
        return F.linear(features[:, 0], net.head.weight, net.head.bias) + \
            0.5 * F.linear(features[:, 1:], net.aux_head.weight, net.aux_head.bias).amax(1)
    return F.linear(features.mean((2, 3)), net.head.weight, net.head.bias)


def test_dense_prediction_is_per_token_probabilities(model):
    image = torch.randn(3, 64, 96)
    dense, overall = visualize.dense_prediction(model, image)
    assert dense.shape == (4, 6, 4) and torch.allclose(dense.sum(-1), torch.ones(4, 6))
    with torch.no_grad():
        tokens = _final_features(model, image)  # the class token, then the 4x6 patches row by row
        aux = F.linear(tokens[0, 1:], model.aux_head.weight, model.aux_head.bias).softmax(-1)
        for r in range(4):
            for c in range(6):
                torch.testing.assert_close(dense[r, c], aux[r * 6 + c], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(overall, _logits_by_hand(model, tokens)[0].softmax(-1), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def visformer():
    torch.manual_seed(0)
    return models.visformer_small(img_size=64, num_classes=4).eval()


def test_visformer_attention_is_the_blocks_own(visformer):
    image = torch.randn(3, 64, 96)
    maps = visualize.visformer_attention(visformer, image, at=(1, 2))
    assert [name for name, _, _ in maps] == [f'stage{s}.{i}' for s in (2, 3) for i in range(4)]
    assert [tuple(w.shape) for _, w, _ in maps] == [(6, 4, 6)] * 4 + [(6, 2, 3)] * 4
    assert [q for _, _, q in maps] == [(3, 5)] * 4 + [(1, 2)] * 4  # the finer grid's cell under the query's centre
    captured = visualize._capture_inputs(visformer, type(visformer.stage3[0].attn), lambda: visformer(image[None]))
    for (name, weights, (r, c)), (module, x) in zip(maps, captured):
        assert torch.allclose(weights.sum((1, 2)), torch.ones(6)) and (weights >= 0).all()
        h, w = x.shape[2:]  # the weights applied to v through proj give the block's output at the query
        with torch.no_grad():
            v = module.qkv(x).reshape(1, 3, module.num_heads, module.head_dim, h * w)[0, 2]
            gathered = (v * weights.reshape(module.num_heads, 1, h * w)).sum(-1).reshape(1, -1, 1, 1)
            assert torch.allclose(module.proj(gathered)[0, :, 0, 0], module(x)[0, :, r, c], rtol=1e-4, atol=1e-4), name
    with pytest.raises(ValueError, match="outside the last attention stage's 2x3 grid"):
        visualize.visformer_attention(visformer, image, at=(2, 0))


def _grad_cam_by_hand(model, layer, image, class_index, grid):
    """Grad-CAM written out: the layer's activations and the gradients of the class score (the logit
    computed from the heads' weights), weights = the gradients' mean over the map, ReLU of the
    weighted sum, scaled to [0, 1], bilinear to the image size, scaled to [0, 1]."""
    saved = {}
    hook = layer.register_forward_hook(lambda module, inputs, output: saved.update(out=output))
    try:
        score = _logits_by_hand(model, _final_features(model, image))[0, class_index]
    finally:
        hook.remove()
    activations = saved['out']
    gradients, = torch.autograd.grad(score, activations)
    if activations.dim() == 3:  # VOLO's tokens (1, N, C), row-major on the grid
        activations, gradients = (t.reshape(1, *grid, -1).permute(0, 3, 1, 2) for t in (activations, gradients))
    weights = gradients.mean((2, 3), keepdim=True)
    cam = (weights * activations).sum(1).clamp(min=0)[0].detach()
    scaled = F.interpolate(_unit_range(cam)[None, None], size=image.shape[1:], mode='bilinear', align_corners=False)
    return _unit_range(scaled[0, 0])  # again: the cells' centres, where the peak lies, fall between pixels


def _unit_range(x):
    return (x - x.min()) / (x.max() - x.min() + 1e-7)


@pytest.mark.parametrize('which', ['volo', 'visformer'])
def test_class_activation_map_is_grad_cam(model, visformer, which):
    net = model if which == 'volo' else visformer
    torch.manual_seed(1)
    image = torch.randn(3, 64, 96)
    heat, top = visualize.class_activation_map(net, image)
    with torch.no_grad():
        logits = _logits_by_hand(net, _final_features(net, image))[0]
    assert top == int(logits.argmax()) and logits[top] > logits.topk(2).values[1] + 1e-4  # the top class, no tie
    layer = visualize.cam_layer(net)
    assert layer is (model.network[-1][-1] if which == 'volo' else visformer.stage3[-1])
    torch.testing.assert_close(heat, _grad_cam_by_hand(net, layer, image, top, (4, 6)), rtol=0, atol=1e-4)
    for class_index in (top, (top + 1) % 4):
        heat, used = visualize.class_activation_map(net, image, class_index)
        expected = _grad_cam_by_hand(net, layer, image, class_index, (4, 6))
        assert used == class_index and heat.shape == (64, 96)
        assert float(heat.min()) >= 0 and float(heat.max()) <= 1 + 1e-6 and float(heat.max()) > 0.99
        assert torch.allclose(heat, expected, atol=1e-4), (which, class_index)


def test_a_model_trained_here_finds_its_object_in_the_corner():
    """The marker test: a small VOLO trained here (class head and aux_head) on objects placed
    anywhere; an image whose only object is in the top-left corner gets the object's class there in
    the dense map, background in the far corner, and a class activation map brighter there."""
    torch.manual_seed(0)
    net = VOLO(layers=[1, 1, 1, 1], img_size=64, num_classes=3, stem_hidden_dim=16, embed_dims=[32, 64, 64, 64],
               num_heads=[2, 4, 4, 4], mlp_ratios=[2, 2, 2, 2], downsamples=[True, False, False, False],
               outlook_attention=[True, False, False, False], post_layers=['ca', 'ca'])
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(80):
        images, tokens, classes = object_scenes(16, generator=generator)
        features = net.forward_features(images)
        loss = F.cross_entropy(net.forward_head(features), classes) + \
            F.cross_entropy(net.aux_head(features[:, 1:]).reshape(-1, 3), tokens.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    for object_class, channel in ((1, 0), (2, 2)):
        image = torch.rand(3, 64, 64, generator=generator) * 0.3
        image[:, :24, :24] = 0.1
        image[channel, :24, :24] = 1.0
        dense, overall = visualize.dense_prediction(net, image)
        label = dense.argmax(-1)
        assert label[0, 0] == object_class and label[3, 3] == 0 and label[0, 3] == 0 and label[3, 0] == 0, label
        assert int(overall.argmax()) == object_class
        heat, _ = visualize.class_activation_map(net, image, object_class)
        assert heat[:16, :16].mean() > heat[48:, 48:].mean()


def test_the_command_writes_the_pictures_of_each_family(tmp_path, capsys):
    Image.fromarray((torch.rand(80, 100, 3) * 255).byte().numpy()).save(tmp_path / 'img.png')
    torch.manual_seed(0)
    volo_test = timm.create_model('volo_test', img_size=64, num_classes=4)  # tests/small_models.py
    for name, net, expected in (('volo_test', volo_test, ['outlook_attention.png', 'class_attention.png',
                                                          'dense_prediction.png', 'class_activation.png']),
                                ('visformer_tiny', models.visformer_tiny(img_size=64, num_classes=4),
                                 ['visformer_attention.png', 'class_activation.png'])):
        torch.save({'state_dict': net.state_dict()}, tmp_path / f'{name}.pth')
        written = visualize.main([str(tmp_path / 'img.png'), '--checkpoint', str(tmp_path / f'{name}.pth'),
                                  '--model', name, '--img-size', '64', '--out', str(tmp_path / name), '--at', '1', '1'])
        assert [os.path.basename(p) for p in written] == expected
        for path in written:
            with Image.open(path) as picture:
                assert picture.size[0] > 200 and picture.size[1] > 100
                assert np.asarray(picture.convert('L')).std() > 10  # something is drawn
    checkpoint = str(tmp_path / 'volo_test.pth')
    for argv, message in ((['--block', '1', '0'], 'block (1, 0) is not an outlooker block'),
                          (['--at', '9', '0'], '--at 9 0 is outside block (0, 0)\'s 4x4 pooled grid'),
                          (['--cam-class', '7'], "class 7 is outside the model's 4 classes")):
        with pytest.raises(SystemExit) as exit_info:
            visualize.cli([str(tmp_path / 'img.png'), '--checkpoint', checkpoint, '--model', 'volo_test',
                           '--img-size', '64', '--out', str(tmp_path / 'x'), *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_token_label_maps_name_the_class_of_the_generated_object(shapes, tmp_path):
    """The generated dataset's labels come from the objects' masks: every token's top class is the
    image's class, scored higher on the object than on the background."""
    for class_index, class_dir in enumerate(sorted(os.listdir(os.path.join(shapes, 'labels')))):
        label = sorted(os.listdir(os.path.join(shapes, 'labels', class_dir)))[0]
        classes, scores = visualize.token_label_map(os.path.join(shapes, 'labels', class_dir, label), 3)
        assert classes.shape == scores.shape == (6, 6)
        assert (classes == class_index).all() and scores.max() > scores.min()
    train_image = sorted(os.listdir(os.path.join(shapes, 'train', class_dir)))[0]
    visualize.draw_token_labels(os.path.join(shapes, 'train', class_dir, train_image), classes, scores,
                                ['a', 'b', 'c'], str(tmp_path / 't.png'))
    with Image.open(tmp_path / 't.png') as picture:
        assert picture.size[0] > 300


def test_the_doc_pictures_script_draws_every_picture(tmp_path):
    written = doc_pictures.main(['--out', str(tmp_path), '--steps', '2'])
    assert sorted(os.path.relpath(p, tmp_path) for p in written) == sorted(
        ['volo/outlook_attention.png', 'volo/class_attention.png', 'volo/dense_prediction.png',
         'volo/class_activation.png', 'visformer/visformer_attention.png', 'visformer/class_activation.png'])
    documented = open(os.path.join(os.path.dirname(__file__), '..', 'docs', 'pictures.md')).read()
    for path in written + [str(tmp_path / 'scene.png')]:
        assert f'(pictures/{os.path.relpath(path, tmp_path)})' in documented
        assert os.path.isfile(os.path.join(os.path.dirname(__file__), '..', 'docs', 'pictures',
                                           os.path.relpath(path, tmp_path)))
        with Image.open(path) as picture:
            picture.verify()
