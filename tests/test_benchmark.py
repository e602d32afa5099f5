"""tools/benchmark.py: the figures in README come from it."""
import timm

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
