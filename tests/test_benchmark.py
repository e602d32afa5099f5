"""tools/benchmark.py: the figures in README come from it."""
import json

import pytest
import timm

from tests.forked import run_forked
from tools import benchmark


def test_forward_flops_match_published_macs():
    args = benchmark.parse_args(['--model', 'volo_d1', '--img-size', '224'])
    flops = benchmark.forward_flops(timm.create_model('volo_d1', mix_token=False), args)
    assert abs(flops / 2 - 6.94e9) / 6.94e9 < 0.01  # timm's table: 6.94 GMACs


def test_benchmark_runs_both_implementations_and_reports_mfu(tmp_path):
    out = tmp_path / 'results.json'
    results = benchmark.main(['--op', 'outlook_attention', '--img-size', '48', '-b', '2', '--device', 'cpu',
                              '--compare-timm', '--warmup', '1', '--iters', '2', '--peak-tflops', '1',
                              '--outlook-impl', 'torch', '--json', str(out)])
    assert {(r['impl'], r['mode']) for r in results} == {
        ('ours', 'infer'), ('timm', 'infer'), ('ours', 'train'), ('timm', 'train')}
    for r in results:
        assert r['ms'] > 0 and r['peak_mib'] > 0 and 0 < r['mfu'] < 1
    assert out.read_text().count('"impl"') == 4
    assert benchmark.peak_tflops(benchmark.parse_args(['--peak-tflops', '5']), 'cpu') == 5.
    assert benchmark.peak_tflops(benchmark.parse_args([]), 'cpu') is None


def test_loader_benchmark_counts_the_files_each_loader_opens(tmp_path):
    """16 images, shards of 4, one worker: a folder epoch opens every image (and every label file
    with token labels), a shard epoch each of the 4 shards once. Run in a forked process: the opens
    are counted by an audit hook, which stays in the process that installs it."""
    from tools import benchmark_loader
    argv = ['--root', str(tmp_path / 'data'), '--images', '16', '--img-size', '32', '-b', '4', '--workers', '1',
            '--batches', '1', '--shard-size', '4', '--device', 'cpu']
    [(code, output)] = run_forked([lambda: benchmark_loader.main(argv)], tmp_path / 'logs')
    assert code == 0, output[-3000:]
    opens = {line[:24].strip(): int(line.split('img/s')[1].split()[0])
             for line in output.splitlines() if 'file opens' in line}
    assert opens == {'folder, plain': 16, 'shards, plain': 4, 'folder, token labels': 32, 'shards, token labels': 4}


def test_task_benchmarks_report_time_throughput_and_memory(tmp_path):
    from tools import benchmark_det, benchmark_seg
    det = benchmark_det.main(['--image-size', '64', '96', '--objects', '2', '-b', '1', '--infer-batch-size', '1',
                              '--warmup', '0', '--iters', '1', '--device', 'cpu', '--no-memory', '--json',
                              str(tmp_path / 'det.json')])
    assert {'train_step_s', 'train_images_per_s', 'infer_batch_s', 'infer_images_per_s'} <= set(det)
    assert det['train_images_per_s'] == pytest.approx(1 / det['train_step_s'])
    assert json.loads((tmp_path / 'det.json').read_text())['params'] == det['params'] == 44794957
    seg = benchmark_seg.main(['--crop-size', '32', '32', '-b', '2', '--image-size', '32', '64', '--stride', '32', '32',
                              '--warmup', '0', '--iters', '1', '--device', 'cpu', '--num-classes', '4', '--mode', 'slide'])
    assert seg['slide_images_per_s'] == pytest.approx(1 / seg['slide_s']) and seg['slide_peak_mib'] > 0
    assert 'train_step_s' not in seg
