"""The tools and the model builders speak in one line: tools/export_onnx.py's checkpoint and
argument errors, tools/make_shards.py's images that do not decode (listed, as its missing labels
are, before anything is written), and the arguments a model is built with through timm and
torch.hub, checked when it is built."""
import os

import numpy as np
import pytest
import timm
from PIL import Image

import hubconf
from tools import export_onnx, make_shards


def one_error_line(capsys, cli, argv):
    with pytest.raises(SystemExit) as stopped:
        cli(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('ERROR')]
    assert stopped.value.code == 2 and len(errors) == 1 and 'Traceback' not in err, err[-2000:]
    return errors[0]


def test_export_onnx_errors_are_one_line(tmp_path, capsys):
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    out = str(tmp_path / 'm.onnx')
    assert f'{text} is not a PyTorch checkpoint: it looks like a text file' in one_error_line(
        capsys, export_onnx.cli, ['--model', 'volo_d1', '--img-size', '32', '--checkpoint', str(text), '--out', out])
    assert '--model volo_d9 at --img-size 32: Unknown model' in one_error_line(
        capsys, export_onnx.cli, ['--model', 'volo_d9', '--img-size', '32', '--out', out])
    assert f'--out {text} would write over --checkpoint {text}' in one_error_line(
        capsys, export_onnx.cli, ['--model', 'volo_d1', '--checkpoint', str(text), '--out', str(text)])
    assert text.read_text() == 'not a checkpoint' and not os.path.exists(out)


def test_make_shards_lists_the_images_that_do_not_decode(tmp_path, capsys):
    root = tmp_path / 'data'
    for split, count in (('train', 3), ('val', 1)):
        (root / split / 'cat').mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / split / 'cat' / f'{i}.jpg')
    good = (root / 'train' / 'cat' / '0.jpg').read_bytes()
    (root / 'train' / 'cat' / 'random.jpg').write_bytes(np.random.default_rng(0).bytes(2000))
    (root / 'train' / 'cat' / 'empty.jpg').write_bytes(b'')
    (root / 'train' / 'cat' / 'truncated.jpg').write_bytes(good[:len(good) // 2])
    os.symlink(root / 'nowhere.jpg', root / 'train' / 'cat' / 'link.jpg')
    code = make_shards.main([str(root), '--output', str(tmp_path / 'shards')])
    err = capsys.readouterr().err
    assert code == 2 and 'Traceback' not in err, err
    assert '4 of 7 images under' in err and 'cannot be decoded' in err
    for name, why in (('random.jpg', 'cannot identify image file'), ('empty.jpg', 'cannot identify image file'),
                      ('truncated.jpg', 'truncated'), ('link.jpg', 'a link to a missing file')):
        assert any(f'cat/{name}: ' in line and why in line for line in err.splitlines()), (name, err)
    assert not (tmp_path / 'shards').exists() or not any((tmp_path / 'shards').rglob('*.tar'))


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_classes=-1), 'num_classes -1: a whole number of classes (0: no classifier)'),
    (dict(num_classes=2.5), 'num_classes 2.5: a whole number of classes'),
    (dict(drop_path_rate=5), 'drop_path_rate 5: a probability, at least 0 and below 1'),
    (dict(drop_rate=-0.1), 'drop_rate -0.1: a probability'),
    (dict(img_size='224'), "img_size '224': the models are built for sizes of 1 to 4096 pixels"),
    (dict(img_size=100000), 'img_size 100000: the models are built for sizes of 1 to 4096 pixels'),
])
@pytest.mark.parametrize('name', ['volo_d1', 'visformer_tiny'])
def test_model_arguments_are_checked_when_the_model_is_built(name, kwargs, message):
    for build in (getattr(hubconf, name), lambda **kw: timm.create_model(name, **kw)):
        with pytest.raises(ValueError) as error:
            build(**kwargs)
        assert message in str(error.value)


def test_no_classifier_is_num_classes_zero():
    model = hubconf.volo_d1(num_classes=0, img_size=32)
    assert model.num_classes == 0 and model(__import__('torch').randn(1, 3, 32, 32)).shape == (1, 384)
