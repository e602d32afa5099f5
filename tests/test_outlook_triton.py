"""The fused Triton outlook attention (layers/outlook_triton.py), run in Triton's interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1), against the unfold/fold reference and the PyTorch path."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip('triton', reason='Triton ships with the Linux CUDA wheels of torch')

import models  # noqa: E402
from layers import outlook_attention, outlook_triton  # noqa: E402
from models import volo  # noqa: E402
from tests.reference_ops import assert_matches_reference, outlook_attention_reference  # noqa: E402
from tests.small_models import small_volo  # noqa: E402


def _twin_modules(dim, heads, **kwargs):
    torch.manual_seed(0)
    fused = volo.OutlookAttention(dim, heads, outlook_impl='triton', **kwargs)
    plain = volo.OutlookAttention(dim, heads, outlook_impl='torch', **kwargs)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_kernels_run_in_the_interpreter_here():
    assert outlook_triton.triton_available() and outlook_triton.interpreting()


# one variant per distinct stage-1 geometry (d2/d3 and d4/d5 share theirs)
STAGE1 = {(cfg['embed_dims'][0], cfg['num_heads'][0]): name for name, cfg in sorted(volo.VARIANTS.items(), reverse=True)}


def test_the_stage1_geometries_are_those_of_every_variant():
    assert sorted(STAGE1.values()) == ['volo_d1', 'volo_d2', 'volo_d4']
    assert {(c['embed_dims'][0], c['num_heads'][0]) for c in volo.VARIANTS.values()} == set(STAGE1)


@pytest.mark.parametrize('name', sorted(STAGE1.values()))
def test_every_variant_stage1_fp32(name):
    """Stage-1 geometry of each variant (k3 s2 p1, its dim and heads), odd grid, batch 1."""
    cfg = volo.VARIANTS[name]
    module, _ = _twin_modules(cfg['embed_dims'][0], cfg['num_heads'][0], kernel_size=3, padding=1, stride=2)
    x = torch.randn(1, 7, 5, cfg['embed_dims'][0], requires_grad=True)
    assert_matches_reference(module, x)


def test_bf16_inputs_keep_their_dtype_and_agree_with_fp32():
    torch.manual_seed(0)
    v = torch.randn(2, 9, 7, 64)
    logits = torch.randn(2, 5, 4, 2, 9, 9) * 3
    exact = outlook_triton.outlook_attention_fused(v, logits, 3, 2, 1, 0.5)
    v16, logits16 = v.bfloat16().requires_grad_(), logits.bfloat16().requires_grad_()
    out = outlook_triton.outlook_attention_fused(v16, logits16, 3, 2, 1, 0.5)
    assert out.dtype == torch.bfloat16
    assert (out.float() - exact).abs().max().item() <= 0.05 * exact.abs().max().item()
    out.float().square().sum().backward()
    assert v16.grad.dtype == logits16.grad.dtype == torch.bfloat16
    assert torch.isfinite(v16.grad.float()).all() and torch.isfinite(logits16.grad.float()).all()


def test_whole_model_matches_the_pytorch_path():
    torch.manual_seed(0)
    plain = small_volo(outlook_impl='torch')
    fused = small_volo(outlook_impl='triton')
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert (fused(x) - plain(x)).abs().max().item() <= 1e-4
    plain.train(), fused.train()
    outputs = []
    for model in (plain, fused):
        torch.manual_seed(1)
        cls, aux, box = model.forward_train(x)
        (cls.square().mean() + aux.square().mean()).backward()
        outputs.append((cls, aux, box))
    assert outputs[0][2] == outputs[1][2]
    for a, b in zip(outputs[0][:2], outputs[1][:2]):
        assert (a - b).abs().max().item() <= 1e-4
    for (n, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-4 * max(1., p.grad.abs().max().item()), n


def _count_fused_calls(monkeypatch):
    """Spy on the implementation the kernels registered with the picker."""
    calls = []
    real, works_on = outlook_attention._FUSED['triton']
    assert real is outlook_triton.outlook_attention_fused

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setitem(outlook_attention._FUSED, 'triton', (spy, works_on))
    return calls


def test_auto_uses_the_pytorch_path_off_cuda_and_triton_when_asked(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(1, 6, 6, 16)
    auto = volo.OutlookAttention(16, 2, 3, 1, 2)
    assert auto.outlook_impl == 'auto'
    auto(x)
    assert calls == []
    volo.OutlookAttention(16, 2, 3, 1, 2, outlook_impl='triton')(x)
    assert calls == [(1, 6, 6, 16)]
    model = small_volo(outlook_impl='triton').eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1 + 1  # one outlooker in the small model


def test_exporting_takes_the_pytorch_path(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    module = volo.OutlookAttention(16, 2, 3, 1, 2, outlook_impl='triton')
    exported = torch.export.export(module, (torch.randn(1, 6, 6, 16),))
    assert calls == []
    x = torch.randn(1, 6, 6, 16)
    assert torch.allclose(exported.module()(x), outlook_attention_reference(module, x), atol=1e-5)


def test_self_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    assert outlook_triton._self_check(torch.device('cpu'))
    real = outlook_triton.outlook_attention_fused
    monkeypatch.setattr(outlook_triton, 'outlook_attention_fused', lambda *a: real(*a) * 1.01)
    with pytest.warns(UserWarning, match=r'differ from the PyTorch path by .* on cpu'):
        assert not outlook_triton._self_check(torch.device('cpu'))

    def broken(*args):
        raise RuntimeError('no kernel image is available')
    monkeypatch.setattr(outlook_triton, 'outlook_attention_fused', broken)
    with pytest.warns(UserWarning, match='failed .*no kernel image'):
        assert not outlook_triton._self_check(torch.device('cpu'))


def test_self_check_result_is_cached_per_device(monkeypatch):
    checked = []
    monkeypatch.setattr(outlook_triton, '_SELF_CHECKS', {})
    monkeypatch.setattr(outlook_triton, '_self_check', lambda device: checked.append(device) or False)
    for _ in range(3):
        assert not outlook_triton.fused_kernels_work(torch.device('cpu'))
    assert checked == [torch.device('cpu')]


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match='outlook_impl must be one of'):
        volo.OutlookAttention(16, 2, outlook_impl='cuda')
    with pytest.raises(ValueError, match='no attention dropout'):
        volo.OutlookAttention(16, 2, attn_drop=0.1, outlook_impl='triton')
    with pytest.raises(ValueError, match=r'expected \(B, h, w, heads, 9, 9\)'):
        outlook_triton.outlook_attention_fused(torch.randn(1, 4, 4, 8), torch.randn(1, 2, 2, 2, 4, 4), 3, 2, 1, .5)
    monkeypatch.setattr(outlook_triton, 'interpreting', lambda: False)
    with pytest.raises(RuntimeError, match='runs on CUDA, or on cpu in Triton.s interpreter'):
        outlook_triton.outlook_attention_fused(torch.randn(1, 4, 4, 8), torch.randn(1, 2, 2, 2, 9, 9), 3, 2, 1, .5)


GPU_TARGETS = [(90, 'bf16'), (80, 'fp32')]


@pytest.fixture(scope='module')
def compiled_for_gpus():
    """tools.compile_outlook_kernels' report for each of GPU_TARGETS, from one interpreter without
    TRITON_INTERPRET (which the compiler needs unset)."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ('import sys\nfrom tools.compile_outlook_kernels import main\n'
              'for arch, dtype in zip(sys.argv[1::2], sys.argv[2::2]):\n'
              '    print("TARGET", arch, dtype, flush=True)\n'
              '    main(["--arch", arch, "--dtype", dtype, "-b", "8"])\n')
    run = subprocess.run([sys.executable, '-c', script, *(str(v) for target in GPU_TARGETS for v in target)],
                         capture_output=True, text=True, env=env, cwd=repo)
    assert run.returncode == 0, run.stderr
    return {tuple(part.split('\n', 1)[0].split()): part for part in run.stdout.split('TARGET ')[1:]}


@pytest.mark.parametrize('arch,dtype', GPU_TARGETS)
def test_kernels_compile_for_real_gpus(compiled_for_gpus, arch, dtype):
    """The interpreter does not compile: build cubins for H100/H200 (sm_90) and A100 (sm_80) with
    Triton's own compiler and ptxas, which need no GPU."""
    report = compiled_for_gpus[(str(arch), dtype)]
    assert f'{dtype}, sm_{arch}' in report, report
    reports = re.findall(r'^(fwd|bwd_logits|bwd_values) .* registers (\d+) .* spill stores (\d+) B', report, re.M)
    assert [name for name, _, _ in reports] == ['fwd', 'bwd_logits', 'bwd_values'], report
    assert all(0 < int(registers) <= 255 for _, registers, _ in reports)


@pytest.mark.parametrize('impl', ['triton', 'torch'])
def test_torch_compile_matches_eager_on_an_odd_map(impl):
    """fullgraph=True: no graph breaks (around the custom ops too); inductor's forward and gradients
    equal eager's. The odd map checks the pooling that works around pytorch/pytorch#198119 (inductor's
    avg_pool2d backward mis-weights ceil-mode edge windows). The kernels run interpreted. Inductor's
    C++ code is generated without SIMD here: the same lowering, half the compile time on 2 cores."""
    torch.manual_seed(0)
    block = volo.Outlooker(32, kernel_size=3, padding=1, stride=2, num_heads=2, outlook_impl=impl)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 7, 9, 32, requires_grad=True)
    with torch._inductor.config.patch({'cpp.vec_isa_ok': False}):
        out = compiled(x)
    ref = block(x)
    assert (out - ref).abs().max().item() <= 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *block.parameters()], g),
                    torch.autograd.grad(ref, [x, *block.parameters()], g)):
        assert (a - b).abs().max().item() <= 1e-5 * max(1., b.abs().max().item())
