import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import models
from data import (DataError, DatasetTokenLabel, TokenLabelMixup, create_token_label_loader,
                  create_token_label_target, load_label_map, pack_sample_target)
from data.synthetic import make_shapes_dataset
from data.transforms import LabelAwareRandAugment, TokenLabelTrainTransform, op_matrix, warp_label_map
from loss import (SoftTargetCrossEntropy, TokenLabelCrossEntropy, TokenLabelGTCrossEntropy,
                  TokenLabelSoftTargetCrossEntropy)
from tests.small_models import small_volo
from tools import generate_token_labels


def _sce(logits, target):
    return float(sum(-(t * torch.log_softmax(l, -1)).sum() for l, t in zip(logits, target)) / len(logits))


# ---------------------------------------------------------------- losses

def test_soft_target_cross_entropy_by_hand():
    x = torch.tensor([[1., 2., 0.], [0., 0., 3.]])
    t = torch.tensor([[0., 1., 0.], [.2, .3, .5]])
    by_hand = (-(torch.log(torch.tensor(np.exp(2) / (np.exp(1) + np.exp(2) + 1))))
               - (.2 * np.log(1 / (2 + np.exp(3))) + .3 * np.log(1 / (2 + np.exp(3)))
                  + .5 * np.log(np.exp(3) / (2 + np.exp(3))))) / 2
    assert SoftTargetCrossEntropy()(x, t).item() == pytest.approx(float(by_hand), rel=1e-6)


def _dense_case():
    torch.manual_seed(0)
    B, N, K = 2, 4, 3
    cls = torch.randn(B, K)
    aux = torch.randn(B, N, K)
    target = torch.softmax(torch.randn(B, K, 2 + N), dim=1)
    return cls, aux, target


@pytest.mark.parametrize('box', [(0, 0, 0, 0), (0, 0, 1, 2)])
def test_token_label_cross_entropy_by_hand(box):
    cls, aux, target = _dense_case()
    N = aux.shape[1]
    lam = 1 - (box[2] - box[0]) * (box[3] - box[1]) / N
    t_cls = target[:, :, 1]
    t_cls = lam * t_cls + (1 - lam) * t_cls.flip(0)
    dense = _sce(aux.reshape(-1, 3), target[:, :, 2:].transpose(1, 2).reshape(-1, 3))
    expected = 1.0 * _sce(cls, t_cls) + 0.5 * dense
    loss = TokenLabelCrossEntropy(dense_weight=0.5, cls_weight=1.0)((cls, aux, box), target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if box != (0, 0, 0, 0):
        assert lam == 0.5


@pytest.mark.parametrize('agree,ratio', [(True, 0.5), (False, 0.9)])
def test_token_label_gt_cross_entropy_blend_ratios(agree, ratio):
    cls, aux, target = _dense_case()
    target = target.clone()
    gt = torch.zeros(2, 3)
    top = target[:, :, 1].argmax(-1)
    gt_class = top if agree else (top + 1) % 3
    gt[torch.arange(2), gt_class] = 1.
    target[:, :, 0] = gt
    t_cls = ratio * target[:, :, 1] + (1 - ratio) * gt
    dense = _sce(aux.reshape(-1, 3), target[:, :, 2:].transpose(1, 2).reshape(-1, 3))
    expected = _sce(cls, t_cls) + 0.5 * dense
    loss = TokenLabelGTCrossEntropy(dense_weight=0.5)((cls, aux, (0, 0, 0, 0)), target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_image_level_targets_are_copied_to_every_token():
    cls, aux, _ = _dense_case()
    target = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    box = (0, 1, 2, 2)  # lam = 1 - 2/4
    mixed = 0.5 * target + 0.5 * target.flip(0)
    expected = _sce(cls, mixed) + _sce(aux.reshape(-1, 3), target.repeat_interleave(4, 0))
    assert TokenLabelCrossEntropy()((cls, aux, box), target).item() == pytest.approx(expected, rel=1e-5)
    assert TokenLabelSoftTargetCrossEntropy()((cls, aux, box), target).item() == pytest.approx(
        _sce(cls, mixed), rel=1e-5)
    assert TokenLabelSoftTargetCrossEntropy()(cls, target).item() == pytest.approx(_sce(cls, target), rel=1e-5)


def test_token_count_mismatch_names_the_label_size():
    cls, aux, _ = _dense_case()
    target = torch.softmax(torch.randn(2, 3, 2 + 9), dim=1)
    with pytest.raises(ValueError, match=r'3x3.*4 \(2x2\).*--token-label-size 2'):
        TokenLabelCrossEntropy()((cls, aux, (0, 0, 0, 0)), target)
    with pytest.raises(ValueError, match='no dense predictions'):
        TokenLabelCrossEntropy()(cls, target)


# ---------------------------------------------------------------- targets

def _layout(label_map, box, cls):
    return pack_sample_target(label_map, box, cls)


def _grid_map(kind, size=8):
    """Top-1 class = column index (kind 'col') or row index ('row'), logit 10."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    best = xs if kind == 'col' else ys
    scores = torch.zeros(5, size, size)
    scores[0] = 10.
    indices = torch.stack([best] + [(best + k) % size for k in range(1, 5)]).float()
    return torch.stack([scores, indices])


def test_target_orientation_columns_and_rows():
    col = _layout(_grid_map('col'), (0., 0., 1., 0.25), 3)   # left quarter: columns 0..1
    row = _layout(_grid_map('row'), (0., 0., 0.25, 1.), 5)   # top quarter: rows 0..1
    y = create_token_label_target(torch.stack([col, row]), num_classes=8, label_size=4)
    col_tokens = y[0, :, 2:].argmax(0).reshape(4, 4)
    row_tokens = y[1, :, 2:].argmax(0).reshape(4, 4)
    assert set(col_tokens.flatten().tolist()) <= {0, 1} and (col_tokens[:, 0] == 0).all()
    assert set(row_tokens.flatten().tolist()) <= {0, 1} and (row_tokens[0] == 0).all()
    # a right-half crop of the column map gives the right columns, left to right
    right = _layout(_grid_map('col'), (0., 0.5, 1., 0.5), 0)
    tokens = create_token_label_target(right[None], num_classes=8, label_size=4)[0, :, 2:].argmax(0).reshape(4, 4)
    assert tokens[0].tolist() == sorted(tokens[0].tolist()) and tokens.min() >= 4
    assert y[0, :, 0].argmax() == 3 and y[1, :, 0].argmax() == 5


def test_full_crop_reproduces_map_and_smoothing():
    torch.manual_seed(0)
    K, S = 12, 6
    label_map = torch.stack([torch.randn(5, S, S) * 3, torch.stack([torch.randperm(K)[:5] for _ in range(S * S)])
                             .T.reshape(5, S, S).float()])
    layout = _layout(label_map, (0., 0., 1., 1.), 7)
    for smoothing in (0.0, 0.1):
        y = create_token_label_target(layout[None], num_classes=K, smoothing=smoothing, label_size=S)
        assert y.shape == (1, K, 2 + S * S)
        dense = torch.zeros(K, S, S).scatter_(0, label_map[1].long(), label_map[0])
        expected = dense.softmax(0).reshape(K, S * S) * (1 - smoothing + smoothing / K) + smoothing / K
        assert torch.allclose(y[0, :, 2:], expected, atol=1e-5)
        gt = torch.full((K,), smoothing / K)
        gt[7] = 1 - smoothing + smoothing / K
        assert torch.allclose(y[0, :, 0], gt)
    labels = create_token_label_target(torch.tensor([2, 0]), num_classes=4, smoothing=0.2)
    assert torch.allclose(labels, torch.tensor([[.05, .05, .85, .05], [.85, .05, .05, .05]]))


def test_batch_size_one_and_mixup_lambda():
    layout = _layout(_grid_map('col'), (0., 0., 1., 1.), 2)
    y = create_token_label_target(layout[None], num_classes=8, label_size=2)
    assert y.shape == (1, 8, 6)
    pair = torch.stack([layout, _layout(_grid_map('row'), (0., 0., 1., 1.), 6)])
    plain = create_token_label_target(pair, num_classes=8, label_size=2)
    mixed = create_token_label_target(pair, num_classes=8, label_size=2, lam=0.7)
    assert torch.allclose(mixed, 0.7 * plain + 0.3 * plain.flip(0))
    with pytest.raises(ValueError, match='class indices up to 7'):
        create_token_label_target(pair, num_classes=5, label_size=2)


def test_token_label_mixup_batch_mode_is_consistent():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    layouts = torch.stack([_layout(_grid_map('col'), (0., 0., 1., 1.), c) for c in range(4)])
    mix = TokenLabelMixup(mixup_alpha=0., cutmix_alpha=1.0, label_smoothing=0., num_classes=8, label_size=4, seed=3)
    mixed_x, y = mix(x.clone(), layouts)
    pasted = (mixed_x != x).any(1)[0]  # pixels of image 0 that came from image 3
    assert pasted.any() and not pasted.all()
    rows, cols = pasted.nonzero(as_tuple=True)
    area_lam = 1 - pasted.sum().item() / (32 * 32)
    plain = create_token_label_target(layouts, num_classes=8, label_size=4)
    assert torch.allclose(y[:, :, :2], area_lam * plain[:, :, :2] + (1 - area_lam) * plain.flip(0)[:, :, :2], atol=1e-6)
    centre = lambda i: (i + 0.5) * 8  # noqa: E731
    for t in range(16):
        r, c = divmod(t, 4)
        inside = rows.min() <= centre(r) <= rows.max() and cols.min() <= centre(c) <= cols.max()
        source = plain.flip(0) if inside else plain
        assert torch.equal(y[0, :, 2 + t], source[0, :, 2 + t])
    mix = TokenLabelMixup(mixup_alpha=1.0, label_smoothing=0., num_classes=8, label_size=4, seed=1)
    mixed_x, y = mix(x.clone(), layouts)
    lam = ((mixed_x - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()
    assert torch.allclose(mixed_x, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    assert torch.allclose(y, lam * plain + (1 - lam) * plain.flip(0), atol=1e-5)


# ---------------------------------------------------------------- augmentation consistency

CELL, CELLS = 15, 6  # 90 px image, 6x6 label map: cell centres are pixel centres


def _cell_image():
    ids = np.arange(CELLS * CELLS).reshape(CELLS, CELLS)
    pixels = np.repeat(np.repeat(ids, CELL, 0), CELL, 1)
    rgb = np.stack([pixels * 7 % 256, pixels * 3 + 10, np.full_like(pixels, 200)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def _cell_map():
    ids = torch.arange(CELLS * CELLS, dtype=torch.float32).reshape(CELLS, CELLS)
    label = torch.zeros(2, 5, CELLS, CELLS)
    label[0, 0] = 5.
    label[1, 0] = ids
    return label


def _check_follows(img, label_map, fill=(128, 128, 128)):
    array = np.asarray(img).astype(int)
    checked = 0
    for r in range(CELLS):
        for c in range(CELLS):
            px = array[r * CELL + CELL // 2, c * CELL + CELL // 2]
            if tuple(px) == fill:
                assert label_map[0, 0, r, c] == 0  # outside the source: uniform (zero) label
                continue
            cell = int(px[1] - 10) // 3
            assert label_map[1, 0, r, c] == cell and label_map[0, 0, r, c] == 5, (r, c)
            checked += 1
    return checked


@pytest.mark.parametrize('name,arg', [('Rotate', 30.), ('Rotate', -12.5), ('ShearX', 0.3), ('ShearY', -0.25),
                                      ('TranslateXRel', 0.2), ('TranslateYRel', -0.3), ('TranslateX', 17.),
                                      ('TranslateY', -22.)])
def test_geometric_ops_move_the_map_with_the_pixels(name, arg):
    from timm.data.auto_augment import NAME_TO_OP
    img = NAME_TO_OP[name](_cell_image(), arg, fillcolor=(128, 128, 128), resample=Image.NEAREST)
    moved = warp_label_map(_cell_map(), [op_matrix(name, arg, 90, 90)], 90, 90)
    assert _check_follows(img, moved) >= 12
    assert not torch.equal(moved, _cell_map())


def test_rand_augment_and_flip_keep_map_in_step():
    random.seed(0)
    np.random.seed(0)
    geometric = ['Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
    ra = LabelAwareRandAugment('rand-m9-n3-mstd0.5', dict(translate_const=40, img_mean=(128, 128, 128),
                                                         interpolation=Image.NEAREST), transforms=geometric)
    applied = 0
    for _ in range(20):
        img, label = ra(_cell_image(), _cell_map())
        applied += len(ra._applied)
        _check_follows(img, label)
    assert applied > 10
    transform = TokenLabelTrainTransform(img_size=30, scale=(1., 1.), ratio=(1., 1.), hflip=1.0, vflip=1.0,
                                         interpolation='nearest')
    tensor, label, box = transform(_cell_image(), _cell_map())
    assert box == (0., 0., 1., 1.) and tensor.shape == (3, 30, 30) and tensor.dtype == torch.uint8
    assert label[1, 0, 0, 0] == CELLS * CELLS - 1  # both flips: the bottom-right cell is now top-left


# ---------------------------------------------------------------- dataset, loader, generator

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_classes=3, train_per_class=6,
                               val_per_class=2, img_size=48, label_size=6)


def test_dataset_layout_and_loader(shapes):
    ds = DatasetTokenLabel(os.path.join(shapes, 'train'), os.path.join(shapes, 'labels'))
    img, layout = ds[0]
    assert layout.shape == (3, 5, 6, 6) and layout[2, 0, 0, :4].tolist() == [0, 0, 1, 1]
    assert layout[2, 0, 0, 5] == ds.samples[0][1]
    loader = create_token_label_loader(ds, 32, 4, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
                                       num_workers=0, device='cpu')
    images, layouts = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert -3 < images.mean() < 3 and layouts.shape == (4, 3, 5, 6, 6)
    y = create_token_label_target(layouts, num_classes=3, smoothing=0.1, label_size=2)
    assert y.shape == (4, 3, 6)
    model = models.volo_d1(img_size=32, num_classes=3).train()
    loss = TokenLabelCrossEntropy(dense_weight=0.5)(model.forward_train(images), y)
    assert torch.isfinite(loss)


def test_missing_and_bad_label_files(shapes, tmp_path):
    import shutil
    labels = tmp_path / 'labels'
    shutil.copytree(os.path.join(shapes, 'labels'), labels)
    removed = sorted(labels.rglob('*.pt'))[:7]
    for p in removed:
        p.unlink()
    with pytest.raises(DataError) as err:
        DatasetTokenLabel(os.path.join(shapes, 'train'), str(labels))
    assert '7 of 18 images' in str(err.value) and os.path.basename(str(removed[0])) in str(err.value)
    with pytest.raises(DataError, match='does not exist'):
        DatasetTokenLabel(os.path.join(shapes, 'train'), str(tmp_path / 'nowhere'))
    bad = tmp_path / 'bad.pt'
    torch.save(torch.zeros(5, 6, 6), bad)
    with pytest.raises(DataError, match=r'bad.pt holds \(5, 6, 6\), expected a \(2, 5, H, W\)'):
        load_label_map(str(bad))
    bad.write_bytes(b'not a tensor file')
    with pytest.raises(DataError, match='cannot read token-label file .*bad.pt'):
        load_label_map(str(bad))


def test_generator_round_trip_and_resume(shapes, tmp_path):
    out = tmp_path / 'generated'
    model = small_volo(img_size=32, num_classes=3)  # registered as volo_test
    ckpt = tmp_path / 'annotator.pth.tar'
    torch.save(model.state_dict(), ckpt)
    argv = [os.path.join(shapes, 'train'), '--output', str(out), '--model', 'volo_test', '--checkpoint', str(ckpt),
            '--num-classes', '3', '--img-size', '96', '-b', '4', '-j', '0', '--topk', '3']
    generate_token_labels.main(argv)
    files = sorted(out.rglob('*.pt'))
    assert len(files) == 18
    label = torch.load(files[0], weights_only=True)
    assert label.dtype == torch.float16 and label.shape == (2, 3, 6, 6)
    # the saved logits are the model's dense aux_head predictions, top-k sorted
    from data.dataset import ImageFolderDataset
    from torchvision import transforms
    folder = ImageFolderDataset(os.path.join(shapes, 'train'))
    t = transforms.Compose([transforms.Resize((96, 96), interpolation=transforms.InterpolationMode.BICUBIC),
                            transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    model96 = small_volo(img_size=96, num_classes=3)
    from utils import load_pretrained_weights
    load_pretrained_weights(model96, str(ckpt))
    with torch.no_grad():
        dense = generate_token_labels.dense_logits(model96.eval(), t(folder.load_image(0))[None])
    top = dense.topk(3, dim=1)
    assert torch.allclose(label[0].float(), top.values[0].half().float(), atol=1e-2)
    assert torch.equal(label[1].long(), top.indices[0])
    # resume: existing files are left untouched, a deleted one is rewritten
    stamp = files[1].stat().st_mtime_ns
    files[0].unlink()
    generate_token_labels.main(argv)
    assert files[0].exists() and files[1].stat().st_mtime_ns == stamp
    # top-5 files load back into the training dataset
    with pytest.raises(ValueError, match='--topk 5 exceeds'):
        generate_token_labels.main(argv[:-2] + ['--output', str(tmp_path / 'top5')])
    generate_token_labels.main([os.path.join(shapes, 'train'), '--output', str(tmp_path / 'top5'), '--model',
                                'volo_d1', '--num-classes', '6', '--img-size', '96', '-b', '8', '-j', '0'])
    ds = DatasetTokenLabel(os.path.join(shapes, 'train'), str(tmp_path / 'top5'))
    assert ds[3][1].shape == (3, 5, 6, 6)


def test_generator_on_a_timm_cnn(shapes, tmp_path):
    out = tmp_path / 'cnn'
    generate_token_labels.main([os.path.join(shapes, 'train'), '--output', str(out), '--model', 'resnet18',
                                '--num-classes', '7', '--img-size', '192', '-b', '6', '-j', '0'])
    label = torch.load(sorted(out.rglob('*.pt'))[0], weights_only=True)
    assert label.shape == (2, 5, 6, 6) and label[1].max() < 7


def test_corrupt_image_is_skipped_with_its_path(shapes, tmp_path, caplog):
    import shutil
    root = tmp_path / 'train'
    shutil.copytree(os.path.join(shapes, 'train'), root)
    victim = sorted(root.rglob('*.png'))[0]
    victim.write_bytes(b'broken')
    ds = DatasetTokenLabel(str(root), os.path.join(shapes, 'labels'))
    with caplog.at_level('WARNING'):
        img, layout = ds[0]
    assert str(victim) in caplog.text
    assert layout[2, 0, 0, 5] == ds.samples[1][1]


@pytest.mark.parametrize('name,arg', [('Rotate', 25.), ('ShearX', -0.3), ('TranslateYRel', 0.2)])
def test_geometric_ops_after_the_crop_move_the_map_too(name, arg):
    from timm.data.auto_augment import NAME_TO_OP
    top, left, size = 15, 30, 45  # a 45x45 crop, kept at its size: output pixels are image pixels
    crop = _cell_image().crop((left, top, left + size, top + size))
    img = np.asarray(NAME_TO_OP[name](crop, arg, fillcolor=(128, 128, 128), resample=Image.NEAREST)).astype(int)
    moved = warp_label_map(_cell_map(), [op_matrix(name, arg, size, size)], 90, 90,
                           frame=(top, left, size, size, size, size))
    checked = 0
    for r in range(1, 4):  # map cells whose centres lie inside the crop
        for c in range(2, 5):
            px = img[r * CELL + CELL // 2 - top, c * CELL + CELL // 2 - left]
            if tuple(px) == (128, 128, 128):
                assert moved[0, 0, r, c] == 0
                continue
            assert moved[1, 0, r, c] == (px[1] - 10) // 3 and moved[0, 0, r, c] == 5, (r, c)
            checked += 1
    assert checked >= 4


def test_aa_after_crop_transform_runs_and_keeps_layout():
    random.seed(1)
    np.random.seed(1)
    transform = TokenLabelTrainTransform(img_size=32, auto_augment='rand-m9-mstd0.5-inc1', aa_after_crop=True)
    for _ in range(10):
        tensor, label, box = transform(_cell_image(), _cell_map())
        assert tensor.shape == (3, 32, 32) and label.shape == (2, 5, CELLS, CELLS) and len(box) == 4
