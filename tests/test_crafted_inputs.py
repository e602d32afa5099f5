"""Crafted and damaged files, absurd sizes and interrupted runs: a file's claims are checked against
its own tensors before anything is built from them (peak memory stays in proportion to the real
file), malformed records are one line naming the file, and nothing is left behind."""
import argparse
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import models
import train_seg
import validate
from engine import explain_out_of_memory
from engine.runs import RunLock
from tests.mindspore_writer import write_mindspore_checkpoint
from tests.small_models import small_volo
from tests.training_runs import FAST, run_fast
from tools import convert_mindcv
from utils import CheckpointError, load_pretrained_weights, read_checkpoint, safe_load
from utils.cli import UsageError
from layers.mindspore_ckpt import MindSporeCheckpointError, _message_classes, read_mindspore_checkpoint

PEAK_GROWTH_LIMIT_MB = 1000  # the model of the real weights built: far under this; the claimed sizes took GBs


def _status_kb(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def run_measured(cli, argv, capsys):
    """(exit code, output, growth of the peak resident memory in MB) of cli(argv) in this process:
    the kernel's high-water mark is reset to the current size first (/proc/self/clear_refs)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    start = _status_kb('VmRSS')
    try:
        code = cli(argv) or 0
    except SystemExit as e:
        code = e.code
    growth = (_status_kb('VmHWM') - start) // 1024
    captured = capsys.readouterr()
    return code, captured.out + captured.err, growth


def test_safetensors_metadata_claiming_another_size_is_refused_before_building(shapes, tmp_path, capsys):
    weights = models.volo_d1(img_size=64, num_classes=3).state_dict()
    path = tmp_path / 'claims_4000.safetensors'
    save_file(weights, str(path), metadata={'format': 'pt', 'model': 'volo_d1', 'img_size': '4000',
                                            'num_classes': '3'})
    code, output, growth = run_measured(validate.cli, [shapes, '--checkpoint', str(path), '-j', '0'], capsys)
    assert code == 2, output[-2000:]
    assert (f'{path}: pos_embed has the shape [1, 4, 4, 384], but volo_d1 with the settings the file states '
            f'(img_size=4000, num_classes=3) has [1, 250, 250, 384]') in output
    assert 'Traceback' not in output and growth < PEAK_GROWTH_LIMIT_MB, growth  # a 4000-px model took 3.2 GB


def test_training_args_claiming_another_size_are_refused(shapes, tmp_path):
    model = models.volo_d1(img_size=64, num_classes=3)
    path = tmp_path / 'claims.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'epoch': 0, 'version': 2,
                'args': argparse.Namespace(model='volo_d1', img_size=20000, num_classes=3)}, path)
    with pytest.raises(CheckpointError, match=r'img_size 20000: the models are built for sizes of 1 to 4096'):
        validate.main([shapes, '--checkpoint', str(path), '-j', '0'])
    torch.save({'state_dict': model.state_dict(), 'args': argparse.Namespace(model='local-dir:/tmp', img_size=64)},
               path)
    with pytest.raises(CheckpointError, match=r"model 'local-dir:/tmp' is not a model name of this repository"):
        validate.main([shapes, '--checkpoint', str(path), '-j', '0'])
    with pytest.raises(UsageError, match=r'--img-size 20000: the models are built for sizes of 1 to 4096'):
        validate.main([shapes, '--model', 'volo_d1', '--img-size', '20000', '-j', '0'])


def test_a_mindspore_grid_claim_is_checked_before_a_model_is_built(tmp_path, capsys):
    tall = write_mindspore_checkpoint(str(tmp_path / 'tall.ckpt'), {'pos_embed': torch.zeros(1, 1800, 1, 3)})
    assert os.path.getsize(tall) < 30_000
    code, output, growth = run_measured(convert_mindcv.main, [tall, str(tmp_path / 'out.pth'), '--model', 'volo_d1'],
                                        capsys)
    assert code == 2 and 'img_size 28800: the models are built for sizes of 1 to 4096' in output, output[-2000:]
    assert growth < PEAK_GROWTH_LIMIT_MB, growth  # building for the claimed grid took 5.7 GB
    narrow = write_mindspore_checkpoint(str(tmp_path / 'narrow.ckpt'), {'pos_embed': torch.zeros(1, 4, 1, 384)})
    with pytest.raises(CheckpointError, match=re.escape(
            'pos_embed has the shape [1, 4, 1, 384], but volo_d1 with the settings the file states (img_size=64, '
            'num_classes=0) has [1, 4, 4, 384]')):
        convert_mindcv.convert(narrow, str(tmp_path / 'out.pth'), 'volo_d1')
    assert not os.path.exists(tmp_path / 'out.pth')


def mindspore_record(path, name, dims, content=b''):
    message = _message_classes()()
    value = message.value.add(tag=name)
    value.tensor.dims.extend(dims)
    value.tensor.tensor_type = 'Float32'
    value.tensor.tensor_content = content
    path.write_bytes(message.SerializeToString())
    return str(path)


@pytest.mark.parametrize('dims', [[1] * 65, [2, -3]], ids=['65 dims', 'negative'])
def test_a_malformed_mindspore_record_is_named(tmp_path, dims):
    path = mindspore_record(tmp_path / 'bad.ckpt', 'blocks.0.weight', dims)
    with pytest.raises(MindSporeCheckpointError, match=rf'{path}: blocks\.0\.weight claims the shape .* at most 8 '
                                                       r'dimensions of size >= 0'):
        read_mindspore_checkpoint(path)
    with pytest.raises(CheckpointError, match='blocks.0.weight claims the shape'):
        safe_load(path)


def safetensors_bytes(header, data=b'\0\0\0\0'):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, 'little') + text + data


@pytest.mark.parametrize('metadata, message', [
    ({'class_names': '[oops'}, r'metadata field class_names must be a JSON list of class names, found \'\[oops\''),
    ({'class_names': '{"a": 1}'}, r'metadata field class_names must be a JSON list of class names'),
    ({'img_size': 'large'}, r'metadata field img_size must be a positive whole number, found \'large\''),
    ({'num_classes': '-3'}, r'metadata field num_classes must be a positive whole number'),
    ({'model': 'local-dir:/tmp/x'}, r"metadata field model must be a model name of this repository or timm's"),
], ids=['class names not JSON', 'class names not a list', 'img_size', 'num_classes', 'model path'])
def test_malformed_safetensors_metadata_is_named(tmp_path, metadata, message):
    path = tmp_path / 'weights.safetensors'
    save_file({'w': torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=f'{path}: {message}'):
        read_checkpoint(str(path))


def test_damaged_safetensors_headers_are_described(tmp_path):
    deep = tmp_path / 'deep.safetensors'
    deep.write_bytes(safetensors_bytes({'w': {'dtype': 'F32', 'shape': [1] * 100, 'data_offsets': [0, 4]}}))
    with pytest.raises(CheckpointError, match=r'tensor w has 100 dimensions; network weights have at most 8'):
        safe_load(str(deep))
    huge = tmp_path / 'huge.safetensors'
    huge.write_bytes((2 ** 60).to_bytes(8, 'little') + b'{"w": {}}')
    with pytest.raises(CheckpointError, match=rf'{huge}: its safetensors header claims {2 ** 60} bytes, more than the '
                                              r'whole file \(17 bytes\): the file is truncated or damaged'):
        safe_load(str(huge))


@pytest.mark.parametrize('config, message', [
    ('{"architecture": ', 'is not a readable JSON model config'),
    ('[' * 100_000 + ']' * 100_000, 'is not a readable JSON model config: nested too deeply'),
], ids=['not JSON', 'nested'])
def test_a_damaged_hub_folder_config_is_named(shapes, tmp_path, config, message):
    folder = tmp_path / 'hub'
    folder.mkdir()
    (folder / 'config.json').write_text(config)
    with pytest.raises(CheckpointError, match=f'{folder / "config.json"} {message}'):
        validate.main([shapes, '--model', f'local-dir:{folder}', '-j', '0'])


def test_a_mismatch_message_reads_well_for_an_unknown_layout(tmp_path):
    model = small_volo()
    state = model.state_dict()
    state['network.0.0.mlp.fc2.bias'] = torch.zeros(7)
    torch.save(state, tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError) as error:
        load_pretrained_weights(small_volo(), str(tmp_path / 'odd.pth'))
    assert 'does not fit the VOLO model (an unknown VOLO layout' in str(error.value)
    assert 'the an ' not in str(error.value)


@pytest.mark.parametrize('argv, message', [
    (['--crop-size', '16000', '16000'], r'--crop-size \[16000, 16000\]: the models are built for sizes of 1 to 4096'),
], ids=['crop 16000'])
def test_absurd_sizes_are_one_line_before_any_compute(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train_seg.cli([str(tmp_path), '--dataset', 'seg-folder', *argv, '--output', str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith('ERROR')]) == 1
    assert re.search(message, err) and 'Traceback' not in err


def test_out_of_memory_in_a_training_step_names_the_options(shapes, tmp_path, monkeypatch, caplog):
    with pytest.raises(UsageError, match=r'out of memory at epoch 0, step 0 \(CUDA out of memory. Tried to allocate '
                                         r'2.00 GiB\): lower -b, --img-size'):
        with explain_out_of_memory('epoch 0, step 0', '-b, --img-size'):
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore text')
    with pytest.raises(ValueError, match='unrelated'):
        with explain_out_of_memory('epoch 0, step 0', '-b'):
            raise ValueError('unrelated')
    import loss

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 68719476736 bytes")

    monkeypatch.setattr(loss.TokenLabelCrossEntropy, 'forward', no_memory)
    with pytest.raises(SystemExit) as exit_info:
        import main as train_script
        train_script.cli([shapes, *FAST, '--epochs', '1', '--output', str(tmp_path)])
    assert exit_info.value.code == 2
    assert "out of memory at epoch 0, step 0 ([enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't " \
           "allocate memory" in caplog.text and 'lower -b, --img-size (or use --amp)' in caplog.text


def test_a_run_abandoned_before_its_first_save_is_cleaned_and_args_yaml_is_replaced(shapes, tmp_path):
    out = tmp_path / 'out'
    abandoned, busy = out / 'train' / '20200101-000000-volo_d1-32', out / 'train' / '20200101-000001-volo_d1-32'
    for run_dir in (abandoned, busy):
        run_dir.mkdir(parents=True)
        (run_dir / 'last.pth.tar.partial').write_bytes(b'PK\3\4 half a checkpoint')
    lock = RunLock(str(busy))  # another process is writing this one
    try:
        run = run_fast(shapes, out, '--epochs', '1')
    finally:
        lock.release()
    assert not (abandoned / 'last.pth.tar.partial').exists()
    assert (busy / 'last.pth.tar.partial').exists()
    inode = os.stat(os.path.join(run, 'args.yaml')).st_ino
    run_fast(shapes, out, '--epochs', '2', '--resume', 'auto')
    assert os.stat(os.path.join(run, 'args.yaml')).st_ino != inode  # replaced whole, never rewritten in place
    assert not [n for n in os.listdir(run) if n.endswith('.partial')]

