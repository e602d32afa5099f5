"""Plain formulations kept as the yardstick for the fast paths in models/."""
import math

import torch
import torch.nn.functional as F


def outlook_attention_reference(module, x):
    """OutlookAttention.forward written the original way: unfold -> softmax-weighted matmul -> fold."""
    B, H, W, C = x.shape
    k, s, p, heads = module.kernel_size, module.stride, module.padding, module.num_heads
    h, w = math.ceil(H / s), math.ceil(W / s)
    v = module.v(x).permute(0, 3, 1, 2)
    v = F.unfold(v, k, padding=p, stride=s).reshape(B, heads, C // heads, k * k, h * w)
    v = v.permute(0, 1, 4, 3, 2)  # B, heads, hw, kk, d
    attn = F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)
    attn = module.attn(attn).reshape(B, h * w, heads, k * k, k * k).permute(0, 2, 1, 3, 4)
    attn = (attn * module.scale).softmax(dim=-1)
    out = (attn @ v).permute(0, 1, 4, 3, 2).reshape(B, C * k * k, h * w)
    out = F.fold(out, (H, W), k, padding=p, stride=s)
    return module.proj(out.permute(0, 2, 3, 1))


def assert_matches_reference(module, x, tol=1e-5):
    """module(x) and the gradients for x and every parameter against the reference, within tol
    (gradients: relative to their largest entry where that is above 1)."""
    out, ref = module(x), outlook_attention_reference(module, x)
    assert (out - ref).abs().max().item() <= tol
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *module.parameters()], g),
                    torch.autograd.grad(ref, [x, *module.parameters()], g)):
        assert (a - b).abs().max().item() <= tol * max(1., b.abs().max().item())
