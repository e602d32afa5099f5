"""tools/visualize.py: the maps are the model's own (shapes, sums, the class attention reproduces
the block's output) and the command writes pictures that decode."""
import os

import pytest
import torch
from PIL import Image

import models
from tools import visualize


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


def test_dense_prediction_is_per_token_probabilities(model):
    image = torch.randn(3, 64, 96)
    dense, overall = visualize.dense_prediction(model, image)
    assert dense.shape == (4, 6, 4) and torch.allclose(dense.sum(-1), torch.ones(4, 6))
    with torch.no_grad():
        assert torch.allclose(overall, model(image[None]).softmax(-1)[0], atol=1e-6)


def test_the_command_writes_three_pictures(model, tmp_path):
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'w.pth')
    Image.fromarray((torch.rand(80, 100, 3) * 255).byte().numpy()).save(tmp_path / 'img.png')
    written = visualize.main([str(tmp_path / 'img.png'), '--checkpoint', str(tmp_path / 'w.pth'), '--model', 'volo_d1',
                              '--img-size', '64', '--out', str(tmp_path / 'pics'), '--at', '1', '2'])
    assert [os.path.basename(p) for p in written] == ['outlook_attention.png', 'class_attention.png',
                                                      'dense_prediction.png']
    for path in written:
        with Image.open(path) as picture:
            assert picture.size[0] > 200 and picture.size[1] > 100


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
