"""The one training step of engine/step.py that every trainer takes: float16 with the loss scaler
on the CPU (an overflow skips the step and lowers the scale), the loss read back to the host once a
step, clipping, EMA and the per-update schedule, against computations made here by hand."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from timm.utils import ModelEmaV2

from engine import TrainingStep, UpdateSchedule
from engine.runtime import Amp, Runtime, native_amp
from utils.cli import NonFiniteLoss


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))


def batch():
    torch.manual_seed(1)
    return torch.randn(4, 8), torch.tensor([0, 1, 2, 1])


def cpu_runtime(amp=Amp()):
    return Runtime(torch.device('cpu'), amp=amp)


def test_float16_on_the_cpu_runs_autocast_with_the_scaler_a_gpu_uses():
    amp = native_amp(torch.device('cpu'), 'float16')
    assert amp.dtype == 'float16' and isinstance(amp.loss_scaler._scaler, torch.amp.GradScaler)
    with amp.autocast():
        assert nn.Linear(8, 3)(torch.randn(2, 8)).dtype == torch.float16
    default = native_amp(torch.device('cpu'))  # --amp alone on a CPU: bfloat16, no scaler
    assert default.dtype == 'bfloat16' and default.loss_scaler is None


def test_an_overflow_skips_the_step_and_lowers_the_scale_then_training_goes_on():
    model, (x, y) = tiny_model(), batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runtime = cpu_runtime(native_amp(torch.device('cpu'), 'float16'))
    scaler = runtime.amp.loss_scaler
    scaler.load_state_dict({'scale': 2.0 ** 40, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                            '_growth_tracker': 0})
    step = TrainingStep(model, optimizer, runtime)
    before = copy.deepcopy(model.state_dict())
    result = step(lambda: nn.functional.cross_entropy(model(x), y), 'step 0')
    assert math.isfinite(result.loss)  # the loss is finite: only the scaled float16 gradients overflowed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step was skipped
    assert scaler.state_dict()['scale'] == 2.0 ** 39
    scaler.load_state_dict(dict(scaler.state_dict(), scale=1024.0))
    step(lambda: nn.functional.cross_entropy(model(x), y), 'step 1')
    assert not torch.equal(before['0.weight'], model.state_dict()['0.weight'])
    assert scaler.state_dict()['scale'] == 1024.0


def test_a_float16_step_updates_the_weights_as_a_float32_step_does():
    x, y = batch()
    updates = {}
    for dtype in ('float32', 'float16'):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        amp = Amp() if dtype == 'float32' else native_amp(torch.device('cpu'), dtype)
        w0 = model[0].weight.detach().clone()
        TrainingStep(model, optimizer, cpu_runtime(amp))(lambda: nn.functional.cross_entropy(model(x), y), 's')
        updates[dtype] = model[0].weight.detach() - w0
    assert updates['float32'].abs().max() > 1e-3
    torch.testing.assert_close(updates['float16'], updates['float32'], rtol=0.02, atol=2e-3)


def test_a_non_finite_loss_stops_before_the_weights_change():
    model, (x, y) = tiny_model(), batch()
    before = copy.deepcopy(model.state_dict())
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), cpu_runtime())
    with pytest.raises(NonFiniteLoss, match=r'non-finite loss \(inf\) at epoch 2, step 5: stopping'):
        step(lambda: nn.functional.cross_entropy(model(x), y) * float('inf'), 'epoch 2, step 5')
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def total_norm(parameters):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()


@pytest.mark.parametrize('amp_dtype', [None, 'float16'])
def test_clipping_bounds_the_gradients_the_optimizer_sees(amp_dtype):
    """Norm clipping on the unscaled gradients, under the loss scaler too."""
    x, y = batch()
    seen = []
    for clip in (None, 0.05):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = optimizer.register_step_pre_hook(lambda opt, *_: seen.append(total_norm(model.parameters())))
        amp = native_amp(torch.device('cpu'), amp_dtype) if amp_dtype else Amp()
        TrainingStep(model, optimizer, cpu_runtime(amp), clip_grad=clip)(
            lambda: nn.functional.cross_entropy(model(x), y), 's')
        handle.remove()
    unclipped, clipped = seen
    assert unclipped > 0.2 and clipped == pytest.approx(0.05, rel=1e-3)


def test_ema_and_schedule_follow_every_update():
    model, (x, y) = tiny_model(), batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ema = ModelEmaV2(model, decay=0.75)
    start = model[0].weight.detach().clone()
    schedule = UpdateSchedule(optimizer, lambda update: 0.1 / (update + 1), start=3)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.1 / 4)
    step = TrainingStep(model, optimizer, cpu_runtime(), schedule=schedule, model_ema=ema, updates=3)
    result = step(lambda: nn.functional.cross_entropy(model(x), y), 's')
    assert result.lr == pytest.approx(0.1 / 4) and step.updates == 4
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.1 / 5)
    torch.testing.assert_close(ema.module[0].weight, 0.75 * start + 0.25 * model[0].weight.detach())


def test_lr_mult_scales_each_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{'params': [a], 'lr_mult': 0.1}, {'params': [b]}], lr=1.0)
    UpdateSchedule(optimizer, lambda update: 2.0)
    assert [g['lr'] for g in optimizer.param_groups] == [pytest.approx(0.2), 2.0]


def test_sync_bn_converts_only_for_several_gpu_processes(caplog):
    from engine import sync_batchnorm
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    several_gpus = Runtime(torch.device('cuda', 0), rank=0, world_size=2)
    assert isinstance(sync_batchnorm(model, several_gpus, True)[1], nn.SyncBatchNorm)
    assert sync_batchnorm(model, several_gpus, False) is model
    assert sync_batchnorm(model, Runtime(torch.device('cuda', 0)), True) is model  # one process: nothing to sync
    assert sync_batchnorm(model, Runtime(torch.device('cpu'), rank=0, world_size=2), True) is model
    assert 'SyncBatchNorm needs CUDA' in caplog.text
