"""What only a GPU shows: the fused kernels compiled for it in fp32/bf16/fp16, torch.compile of
VOLO-D1 with them, mixed-precision training steps against float32, SyncBatchNorm in train_seg.py,
NCCL and DDP, the training step's host reads, and the cuDNN/TF32 settings. These tests carry the
`gpu` marker and skip without CUDA; `python -m tools.gpu_check` runs them (and the GPU benchmarks)
with the kernels compiled. Run directly: `python -m pytest -m gpu` (tests/conftest.py runs Triton in
its interpreter for the kernels' CPU tests, except under `-m gpu`; the interpreter is chosen once per
process, so the tests that need the compiled kernels skip under it).

The tests without the marker check, on any machine, what decides the GPU settings and the
command's behaviour without a GPU."""
import argparse
import copy
import json
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import models
import train_seg
from data.synthetic_seg import make_seg_dataset
from engine.runtime import Amp, Runtime, configure_cuda, distributed_model, native_amp, setup_runtime
from engine.step import TrainingStep
from engine.summary import read_summary
from layers import outlook_triton
from models import DenseTrainingForward, volo
from tests.forked import free_port
from tests.small_models import small_volo
from tools import gpu_check
from utils.cli import NonFiniteLoss, PartialFailure, UsageError

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
needs_kernels = pytest.mark.skipif(  # on a machine with CUDA (needs_cuda says it where there is none)
    torch.cuda.is_available() and (not outlook_triton.triton_available() or outlook_triton.interpreting()),
    reason="needs the fused kernels compiled, not Triton's interpreter: python -m pytest -m gpu")

CUDA = torch.device('cuda', 0)


def settings():
    """(cudnn.benchmark, TF32 in matmuls, TF32 in cuDNN)."""
    return torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def cuda_settings():
    """cudnn.benchmark and the TF32 switches, put back as they were after the test."""
    saved = settings()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def exact_float32(cuda_settings):
    """float32 matmuls and convolutions in float32, not TF32: the reference of the comparisons."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_configure_cuda_sets_cudnn_benchmark_and_tf32_on_gpus_only(cuda_settings):
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    configure_cuda(torch.device('cpu'))
    assert settings() == (False, False, False)
    configure_cuda(torch.device('cuda'))  # a device object only: nothing runs on it
    assert settings() == (True, True, True)


def test_gpu_check_without_cuda_is_one_line_and_exit_code_2(monkeypatch, capfd, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(gpu_check, 'run_command', lambda *a: pytest.fail(f'ran {a} without CUDA'))
    out = tmp_path / 'report.md'
    with pytest.raises(SystemExit) as stopped:
        gpu_check.cli(['--out', str(out)])
    assert stopped.value.code == 2
    captured = capfd.readouterr()
    assert captured.out == ''
    assert captured.err.splitlines() == [
        f'ERROR: tools.gpu_check needs a CUDA device and torch {torch.__version__} finds none here']
    assert not out.exists()


def fake_gpu_runs(monkeypatch, failing=()):
    """A CUDA device that is an H100 and subprocesses that answer as the tests and tools.benchmark
    would (two rows per benchmark, ours twice as fast); the benchmarks named in `failing` stop at
    their timeout. Returns the commands run."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda index=None: 'NVIDIA H100 80GB HBM3')
    monkeypatch.setattr(torch.cuda, 'get_device_properties',
                        lambda index=None: argparse.Namespace(major=9, minor=0, total_memory=80 * 2 ** 30))
    ran = []

    def run(command, timeout):
        ran.append((command, timeout))
        if 'pytest' in command:
            return gpu_check.Finished(0, '..............s\nSKIPPED [1] tests/test_gpu.py:1: why\n'
                                      '==== 14 passed, 1 skipped, 600 deselected in 150.20s ====\n', 150.2)
        what = next(w for w, options, _ in gpu_check.BENCHMARKS if command[2:-2] == options)
        if what in failing:
            return gpu_check.Finished(None, 'compiling...', timeout)
        mode = 'infer' if 'infer' in command else 'train'
        rows = [dict(impl=impl, mode=mode, batch=128, ms=ms, images_per_s=128000 / ms, peak_mib=1000., mfu=0.3)
                for impl, ms in (('ours', 100.), ('timm', 200.))]
        with open(command[-1], 'w') as f:
            json.dump(rows, f)
        return gpu_check.Finished(0, '', 30.)
    monkeypatch.setattr(gpu_check, 'run_command', run)
    return ran


def test_gpu_check_report_names_the_card_versions_tests_and_figures(monkeypatch, tmp_path):
    ran = fake_gpu_runs(monkeypatch)
    out = tmp_path / 'report.md'
    assert gpu_check.main(['--out', str(out)]) == str(out)
    report = out.read_text()
    assert report.startswith('# GPU check\n')
    assert 'NVIDIA H100 80GB HBM3 (sm_90, 80.0 GiB)' in report
    for package in ('torch', 'timm', 'triton'):
        assert f'{package} {__import__(package).__version__}' in report
    assert '**14 passed, 1 skipped, 600 deselected in 150.20s (exit code 0, 150 s)**' in report
    assert 'SKIPPED [1] tests/test_gpu.py:1: why' in report
    assert report.count('| this repo |') == report.count('| timm |') == len(gpu_check.BENCHMARKS)
    assert ('| VOLO-D1 training, torch.compile | this repo | train | 128 | 100.0 | 1,280.0 | 1,000 | 30.0% | 2.00x |'
            in report)
    assert ran[0][0][:4] == ['-m', 'pytest', '-m', 'gpu'] and len(ran) == 1 + len(gpu_check.BENCHMARKS)
    assert all('--device cuda --precision bf16' in ' '.join(command) for command, _ in ran[1:])
    assert report.count('python -m tools.benchmark ') == len(gpu_check.BENCHMARKS)

    readme = tmp_path / 'README.md'  # an input, or any file that is not a report: refused before any run
    readme.write_text('# Project\n')
    ran.clear()
    with pytest.raises(UsageError, match='not a report of tools.gpu_check; not overwriting it'):
        gpu_check.main(['--out', str(readme)])
    assert ran == [] and readme.read_text() == '# Project\n'


def test_gpu_check_says_what_failed_and_still_writes_the_report(monkeypatch, tmp_path):
    fake_gpu_runs(monkeypatch, failing={'VOLO-D1 training, torch.compile'})
    out = tmp_path / 'report.md'
    out.write_text('# GPU check\nan earlier report\n')
    with pytest.raises(PartialFailure, match="benchmark 'VOLO-D1 training, torch.compile'"):
        gpu_check.main(['--out', str(out)])
    report = out.read_text()
    assert '**VOLO-D1 training, torch.compile: stopped at its timeout' in report
    assert 'an earlier report' not in report and report.count('| this repo |') == len(gpu_check.BENCHMARKS) - 1

    with pytest.raises(PartialFailure, match='the GPU tests, benchmark .*: see'):
        gpu_check.main(['--out', str(out), '--budget', '5'])  # too little to start anything
    report = out.read_text()
    assert '**stopped at the time limit**' in report and '| this repo |' not in report
    assert report.count('not run: the time budget was spent') == len(gpu_check.BENCHMARKS)


# ---- on a GPU ----

def relative_error(value, reference):
    return ((value.double() - reference).abs().max() / reference.abs().max().clamp(min=1e-12)).item()


def forward_backward(module, x, grad, dtype):
    """The output and the gradients of the input and of every parameter, in float64, of `module`
    in `dtype` on CUDA."""
    module = module.to(CUDA, dtype)
    x = x.to(CUDA, dtype, copy=True).requires_grad_()
    out = module(x)
    out.backward(grad.to(CUDA, dtype))
    named = {'output': out, 'input grad': x.grad, **{f'{n} grad': p.grad for n, p in module.named_parameters()}}
    return {name: t.detach().double() for name, t in named.items()}


# tolerance of the kernels, relative to the largest value, where the PyTorch path in the same dtype does better
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@gpu
@needs_cuda
@needs_kernels
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda dtype: str(dtype)[len('torch.'):])
@pytest.mark.parametrize('batch,height,width', [(8, 28, 28), (2, 7, 5), (3, 13, 11)])
def test_the_kernels_match_the_pytorch_path(exact_float32, dtype, batch, height, width):
    """VOLO-D1's stage 1 (dim 192, 6 heads, kernel 3, padding 1, stride 2) at 224 px and on odd
    grids, forward and backward, in each dtype on CUDA: the kernels are as close to the float64
    result as the PyTorch path in the same dtype (within twice its error, or the dtype's tolerance)."""
    torch.manual_seed(0)
    fused = volo.OutlookAttention(192, 6, kernel_size=3, padding=1, stride=2, outlook_impl='triton')
    plain = volo.OutlookAttention(192, 6, kernel_size=3, padding=1, stride=2, outlook_impl='torch')
    plain.load_state_dict(fused.state_dict())
    x, grad = torch.randn(batch, height, width, 192), torch.randn(batch, height, width, 192)
    exact = forward_backward(copy.deepcopy(plain), x, grad, torch.float64)
    got = forward_backward(fused, x, grad, dtype)
    baseline = forward_backward(plain, x, grad, dtype)
    for name, reference in exact.items():
        error, plain_error = relative_error(got[name], reference), relative_error(baseline[name], reference)
        assert error <= max(KERNEL_TOLERANCE[dtype], 2 * plain_error), (name, error, plain_error)


@gpu
@needs_cuda
@needs_kernels
def test_torch_compile_of_volo_d1_keeps_the_kernels_in_one_graph(exact_float32):
    """Training forward and backward of VOLO-D1 with the kernels: dynamo sees one graph holding the
    custom op (no graph break), and the compiled outputs and gradients are as close to float64's as
    eager's are (within twice eager's error: the stem's BatchNorm gradients cancel to ~1e-3 in float32)."""
    torch.manual_seed(0)
    model = DenseTrainingForward(models.volo_d1(mix_token=False, outlook_impl='triton')).to(CUDA).train()
    x = torch.randn(2, 3, 224, 224, device=CUDA)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert 'volo.outlook_attention' in explained.graphs[0].code

    def outputs_and_gradients(module, run, inputs):
        module.zero_grad(set_to_none=True)
        cls, aux, _ = run(inputs)
        (cls.square().mean() + aux.square().mean()).backward()
        return [cls, aux] + [p.grad for p in module.parameters()]
    twin = copy.deepcopy(model).double()
    exact = [t.double() for t in outputs_and_gradients(twin, twin, x.double())]
    eager = outputs_and_gradients(model, model, x)
    compiled = outputs_and_gradients(model, torch.compile(model, fullgraph=True), x)
    names = ['class logits', 'dense logits'] + [n for n, _ in model.named_parameters()]
    for name, reference, a, b in zip(names, exact, eager, compiled):
        error, eager_error = relative_error(b, reference), relative_error(a, reference)
        assert error <= max(1e-4, 2 * eager_error), (name, error, eager_error)


def one_step(initial, runtime, images, target):
    """(loss, weights after - weights before) of one TrainingStep (SGD, lr 0.01) of VOLO-D1 from
    the weights `initial`."""
    model = models.volo_d1(outlook_impl='triton')
    model.load_state_dict(initial)
    model.to(CUDA).train()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = TrainingStep(model, optimizer, runtime)(lambda: F.cross_entropy(model(images), target), 'step 1')
    return result.loss, torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@gpu
@needs_cuda
@needs_kernels
@pytest.mark.parametrize('amp_dtype', ['float16', 'bfloat16'])
def test_a_mixed_precision_step_of_volo_d1_matches_float32(exact_float32, amp_dtype):
    """The engine's step in float16 with the loss scaler, or bfloat16, against float32 from the same
    weights and batch: the same loss and the same update. A float16 step whose scaled gradients
    overflow is skipped (weights kept, scale halved), as torch.amp.GradScaler does; the next is
    taken."""
    torch.manual_seed(0)
    initial = models.volo_d1().state_dict()
    images = torch.randn(8, 3, 224, 224, device=CUDA)
    target = torch.randint(0, 1000, (8,), device=CUDA)
    loss32, update32 = one_step(initial, Runtime(CUDA), images, target)
    runtime = Runtime(CUDA, amp=native_amp(CUDA, amp_dtype))
    assert (runtime.amp.loss_scaler is not None) == (amp_dtype == 'float16')
    for skipped in range(10):
        loss, update = one_step(initial, runtime, images, target)
        if update.abs().max() > 0:
            break
    if skipped:
        assert amp_dtype == 'float16' and runtime.amp.loss_scaler._scaler.get_scale() == 2. ** (16 - skipped)
    assert abs(loss - loss32) <= 1e-2 * abs(loss32)
    assert F.cosine_similarity(update, update32, dim=0).item() >= 0.99
    assert ((update - update32).norm() / update32.norm()).item() <= 0.1


@pytest.fixture
def nccl_group_of_one(monkeypatch):
    """A process group of one rank over NCCL, in this process, with torchrun's environment (RANK 0
    of WORLD_SIZE 1); the engine takes the run as distributed (DDP, SyncBatchNorm, the agreed loss)
    while the group exists, as it does a run of several GPUs. engine.runtime.init_distributed starts
    a group only for WORLD_SIZE > 1, and NCCL refuses two ranks on one GPU, so this is the most of a
    distributed run that one GPU can hold."""
    port = free_port()
    for name, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR='127.0.0.1', MASTER_PORT=port).items():
        monkeypatch.setenv(name, str(value))
    torch.cuda.set_device(0)
    dist.init_process_group('nccl', init_method='env://', device_id=torch.device('cuda', 0))
    monkeypatch.setattr(Runtime, 'distributed', property(lambda self: dist.is_initialized()))
    yield
    if dist.is_initialized():  # train_seg leaves the group at its end
        dist.destroy_process_group()


def count_calls(monkeypatch, cls):
    """The number of forward calls of every `cls` module from now on (a list, to read later)."""
    calls, forward = [], cls.forward

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(cls, 'forward', counted)
    return calls


@gpu
@needs_cuda
def test_train_seg_trains_and_evaluates_with_syncbn_and_ddp_over_nccl(nccl_group_of_one, monkeypatch, tmp_path,
                                                                      cuda_settings):
    """train_seg.py's own path for several GPUs, on one: its SyncBatchNorm conversion of the
    segmentor on CUDA, DDP around it, the loss agreed over NCCL, and the metric summed over NCCL
    at the evaluations. One rank is what one GPU can hold (see nccl_group_of_one); with one rank
    torch's SyncBatchNorm normalises with the local statistics, so the gathering of statistics
    across GPUs needs a machine of several."""
    syncbn = count_calls(monkeypatch, nn.SyncBatchNorm)
    ddp = count_calls(monkeypatch, nn.parallel.DistributedDataParallel)
    data = make_seg_dataset(str(tmp_path / 'data'), 'seg-folder', num_classes=4, train=4, val=2, size=(48, 48))
    run = train_seg.main([data, '--dataset', 'seg-folder', '--model', 'volo_d1', '--crop-size', '32', '32', '-b', '2',
                          '--warmup-iters', '1', '-j', '0', '--head-channels', '32', '--aux-channels', '16',
                          '--drop-path', '0', '--iters', '4', '--eval-interval', '2', '--eval-mode', 'whole',
                          '--device', 'cuda', '--output', str(tmp_path / 'out')])
    assert len(ddp) == 4 and len(syncbn) >= 4
    rows = read_summary(os.path.join(run, 'summary.csv'))
    assert [r['iteration'] for r in rows] == ['2', '4']
    assert all(math.isfinite(float(r['train_loss'])) and 0 <= float(r['eval_mIoU']) <= 100 for r in rows)
    assert settings() == (True, True, True)  # setup_runtime's cuDNN and TF32 settings for the GPU


@gpu
@needs_cuda
def test_ddp_over_nccl_takes_the_same_steps_and_stops_together(nccl_group_of_one):
    """engine.runtime.distributed_model wraps the model in DDP on its GPU; the step through DDP over
    NCCL (gradients all-reduced, the loss agreed) equals the step without it, and a NaN loss stops
    with the rank named, after gathering the losses over NCCL."""
    torch.manual_seed(0)
    plain = small_volo(outlook_impl='torch').to(CUDA).train()
    twin = copy.deepcopy(plain)
    runtime = Runtime(CUDA)
    wrapped = distributed_model(twin, runtime)
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.device_ids == [0]
    images, target = torch.randn(4, 3, 32, 32, device=CUDA), torch.randint(0, 10, (4,), device=CUDA)
    steps = [TrainingStep(m, torch.optim.AdamW(m.parameters(), lr=1e-3), runtime) for m in (plain, wrapped)]
    for i in range(2):  # DDP checks at the second step that the first reduced every gradient
        plain_loss = steps[0](lambda: F.cross_entropy(plain(images), target), f'step {i}').loss
        ddp_loss = steps[1](lambda: F.cross_entropy(wrapped(images), target), f'step {i}').loss
        assert ddp_loss == pytest.approx(plain_loss, rel=1e-5)
    for p, q in zip(plain.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
    with pytest.raises(NonFiniteLoss, match=r'non-finite loss rank 0 \(nan\) at step 2'):
        steps[1](lambda: F.cross_entropy(wrapped(images), target) * math.nan, 'step 2')


SYNC_IMPLS = ['torch', pytest.param('triton', marks=needs_kernels)]


@gpu
@needs_cuda
@pytest.mark.parametrize('impl', SYNC_IMPLS)
@pytest.mark.parametrize('amp_dtype', ['float32', 'bfloat16'])
def test_a_training_step_reads_the_host_once(amp_dtype, impl):
    """Under torch.cuda.set_sync_debug_mode('warn'), every synchronising CUDA call warns: a step
    (forward, loss, backward, norm clipping, AdamW) makes one, the read of the loss."""
    torch.manual_seed(0)
    model = small_volo(outlook_impl=impl).to(CUDA).train()
    runtime = Runtime(CUDA, amp=Amp() if amp_dtype == 'float32' else native_amp(CUDA, amp_dtype))
    step = TrainingStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), runtime, clip_grad=1.0)
    images, target = torch.randn(4, 3, 32, 32, device=CUDA), torch.randint(0, 10, (4,), device=CUDA)

    def forward():
        return F.cross_entropy(model(images), target)
    step(forward, 'warm-up')  # optimizer state, cuDNN's choices
    steps = 3
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            for i in range(steps):
                step(forward, f'step {i}')
    finally:
        torch.cuda.set_sync_debug_mode('default')
    syncs = [str(w.message) for w in caught if 'synchroniz' in str(w.message)]
    assert 1 <= len(syncs) <= steps, syncs


@gpu
@needs_cuda
def test_setup_runtime_on_a_gpu_sets_cudnn_benchmark_and_tf32(cuda_settings):
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    args = argparse.Namespace(device='cuda', seed=0, amp=True, native_amp=False, apex_amp=False, amp_dtype='bfloat16')
    runtime = setup_runtime(args)
    assert runtime.device == torch.device('cuda', 0) and not runtime.distributed
    assert runtime.amp.dtype == 'bfloat16' and runtime.amp.loss_scaler is None
    assert settings() == (True, True, True)
