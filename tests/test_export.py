"""Deployment paths: ONNX at opset 17 (no Col2Im) and torch.compile, against eager PyTorch."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from models import volo
from tests.reference_ops import assert_matches_reference
from tests.small_models import small_volo
from tools import export_onnx


def test_onnx_opset17_export_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = small_volo()
    path = str(tmp_path / 'volo_d1.onnx')
    version, diff = export_onnx.export(model, 32, path, opset=17)
    assert version == 17 and diff <= 1e-4
    # the written file, run here by onnxruntime on images of this test, against the eval-mode model's logits
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    [given] = session.get_inputs()
    got = session.run(None, {given.name: x.numpy()})[0]
    assert got.shape == expected.shape == (2, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    graph = onnx.load(path)
    assert 'Col2Im' not in {n.op_type for n in graph.graph.node}
    assert {o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')} == {17}


def test_torch_compile_cpu_matches_eager():
    """The whole model traces without graph breaks, custom autograd functions included, and the
    captured forward and backward equal eager's. Inductor's code generation for the blocks with
    custom functions (Outlooker: window gather/scatter, small softmax, GELU-recomputing MLP) is
    checked in test_outlook_triton.py::test_torch_compile_matches_eager_on_an_odd_map."""
    torch.manual_seed(0)
    model = small_volo(mix_token=False)
    training_forward = volo.DenseTrainingForward(model)  # main.py's: forward_train in training
    compiled = torch.compile(training_forward, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    training_forward.eval()
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() <= 1e-4
    training_forward.train()
    cls, aux, _ = compiled(x)
    (cls.square().mean() + aux.square().mean()).backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cls_e, aux_e, _ = model.forward_train(x)
    (cls_e.square().mean() + aux_e.square().mean()).backward()
    assert (cls - cls_e).abs().max().item() <= 1e-4
    for n, p in model.named_parameters():
        assert (compiled_grads[n] - p.grad).abs().max().item() <= 1e-4, n


@pytest.mark.parametrize('name', sorted(volo.VARIANTS))
def test_fast_outlook_attention_every_variant_fp32(name):
    """Stage-1 outlook attention of each variant at its 224-px grid, batch 1, forward and gradients."""
    cfg = volo.VARIANTS[name]
    torch.manual_seed(0)
    module = volo.OutlookAttention(cfg['embed_dims'][0], cfg['num_heads'][0], kernel_size=3, padding=1, stride=2)
    x = torch.randn(1, 28, 28, cfg['embed_dims'][0], requires_grad=True)
    assert_matches_reference(module, x)
