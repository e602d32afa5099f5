"""Outlook attention as three Triton kernels: softmax, window aggregation and fold fused.

`outlook_attention_fused(v, logits, kernel_size, stride, padding, scale)` takes
    v       (B, H, W, C)                    the value projection, channels-last,
    logits  (B, h, w, heads, k*k, k*k)      the attention logits of each window (before scaling),
and returns what `fold(softmax(scale * logits) @ unfold(v))` returns, (B, H, W, C), without
materialising the unfolded windows or the folded sums. Every kernel is a gather, so results are
deterministic (no atomics):
    forward    one program per tile of output pixels and head: for each window covering a pixel
               (at most ceil(k/s)^2), the softmax of the logits row at that pixel's position,
               times the window's k*k value vectors; writes the probabilities for the backward;
    backward   per logits row: d logits = scale * p * (dp - <p, dp>), dp_q = <grad_out, v_q>;
               per value pixel: the sum, over the windows that hold it, of p[:, q] . grad_out.

On CUDA the kernels are compiled; on CPU they run in Triton's interpreter, which is slow and there for
the tests. Both directions are custom ops with shape functions, so torch.compile captures them whole.
"""
import math
import warnings
from typing import Tuple

import torch

from .outlook_attention import outlook_aggregate, register_fused_impl

try:
    import triton
    import triton.language as tl
    from torch.library import custom_op
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None

__all__ = ['triton_available', 'interpreting', 'outlook_attention_fused', 'fused_kernels_work']


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (on CPU tensors): TRITON_INTERPRET=1 when
    triton was first imported, which `import torch` does."""
    return triton is not None and not isinstance(_KERNELS['fwd'], triton.runtime.jit.JITFunction)


if triton is not None:

    # Pixel, row and window indices are int32 (fewer registers); element offsets are int64.

    @triton.jit
    def _pixel_tile(n_pixels, H, W, BLOCK_P: tl.constexpr):
        """This program's pixels of the flattened (B, H, W) map: (mask, b, y, x)."""
        pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        return pix < n_pixels, pix // (W * H), (pix // W) % H, pix % W

    @triton.jit
    def _covering_window(ok, y, x, a, c, h, w, K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr):
        """The a-th row and c-th column window covering (y, x), and the place (ki, kj) of (y, x) in
        it: (mask, iy, ix, ki, kj); indices are 0 where the window does not exist."""
        iy = (y + PAD) // STRIDE - a
        ix = (x + PAD) // STRIDE - c
        ki = y + PAD - iy * STRIDE
        kj = x + PAD - ix * STRIDE
        ok = ok & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w) & (ki < K) & (kj < K)
        return ok, tl.where(ok, iy, 0), tl.where(ok, ix, 0), tl.where(ok, ki, 0), tl.where(ok, kj, 0)

    @triton.jit
    def _window_pixel(ok, b, iy, ix, q, H, W, C, K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr):
        """Place q of window (iy, ix): (inside the map, element offset of its first channel)."""
        y = iy * STRIDE - PAD + q // K
        x = ix * STRIDE - PAD + q % K
        ok = ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        return ok, ((b * H + tl.where(ok, y, 0)) * W + tl.where(ok, x, 0)).to(tl.int64) * C

    @triton.jit
    def _outlook_fwd(v_ptr, logits_ptr, out_ptr, prob_ptr, scale_ptr, n_pixels, H, W, h, w, C,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, K: tl.constexpr,
                     STRIDE: tl.constexpr, PAD: tl.constexpr, WINDOWS: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, KK_PAD: tl.constexpr, FP64: tl.constexpr):
        KK: tl.constexpr = K * K
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        scale = tl.load(scale_ptr)
        head = tl.program_id(1)
        pix_ok, b, y, x = _pixel_tile(n_pixels, H, W, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        channel = head * HEAD_DIM + d
        cols = tl.arange(0, KK_PAD)

        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
        for a in range(WINDOWS):
            for c in range(WINDOWS):
                ok, iy, ix, ki, kj = _covering_window(pix_ok, y, x, a, c, h, w, K, STRIDE, PAD)
                # the softmax of this pixel's logits row in the window
                row = ((((b * h + iy) * w + ix) * HEADS + head) * KK + ki * K + kj).to(tl.int64) * KK
                row_mask = ok[:, None] & (cols < KK)[None, :]
                logit = tl.load(logits_ptr + row[:, None] + cols[None, :], mask=row_mask,
                                other=-float('inf')).to(ACC)
                top = tl.where(ok, tl.max(logit, axis=1), 0.)
                e = tl.where(row_mask, tl.exp((logit - top[:, None]) * scale), 0.)
                inv_sum = 1. / tl.where(ok, tl.sum(e, axis=1), 1.)
                for q in range(KK):
                    p = tl.load(logits_ptr + row + q, mask=ok, other=0.).to(ACC)
                    p = tl.where(ok, tl.exp((p - top) * scale) * inv_sum, 0.)
                    tl.store(prob_ptr + row + q, p.to(prob_ptr.dtype.element_ty), mask=ok)
                    src_ok, src = _window_pixel(ok, b, iy, ix, q, H, W, C, K, STRIDE, PAD)
                    val = tl.load(v_ptr + src[:, None] + channel[None, :],
                                  mask=src_ok[:, None] & d_ok[None, :], other=0.).to(ACC)
                    acc += p[:, None] * val
        dst = ((b * H + y) * W + x).to(tl.int64) * C
        tl.store(out_ptr + dst[:, None] + channel[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=pix_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _outlook_bwd_logits(grad_ptr, v_ptr, prob_ptr, grad_logits_ptr, scale_ptr, n_rows, H, W, h, w, C,
                            HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, K: tl.constexpr,
                            STRIDE: tl.constexpr, PAD: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, KK_PAD: tl.constexpr, FP64: tl.constexpr):
        KK: tl.constexpr = K * K
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        scale = tl.load(scale_ptr)
        head = tl.program_id(1)
        # one logits row per lane: window (b, iy, ix), query place pos in it
        r = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        r_ok = r < n_rows
        pos = r % KK
        ix = (r // KK) % w
        iy = (r // (KK * w)) % h
        b = r // (KK * w * h)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        channel = head * HEAD_DIM + d
        cols = tl.arange(0, KK_PAD)

        ok, at = _window_pixel(r_ok, b, iy, ix, pos, H, W, C, K, STRIDE, PAD)
        g = tl.load(grad_ptr + at[:, None] + channel[None, :], mask=ok[:, None] & d_ok[None, :],
                    other=0.).to(ACC)
        dp = tl.zeros((BLOCK_P, KK_PAD), dtype=ACC)
        for q in range(KK):
            src_ok, src = _window_pixel(ok, b, iy, ix, q, H, W, C, K, STRIDE, PAD)
            val = tl.load(v_ptr + src[:, None] + channel[None, :],
                          mask=src_ok[:, None] & d_ok[None, :], other=0.).to(ACC)
            dp = tl.where(cols[None, :] == q, tl.sum(g * val, axis=1)[:, None], dp)
        row = ((((b * h + iy) * w + ix) * HEADS + head) * KK + pos).to(tl.int64) * KK
        col_ok = (cols < KK)[None, :]
        p = tl.load(prob_ptr + row[:, None] + cols[None, :], mask=ok[:, None] & col_ok, other=0.).to(ACC)
        grad = scale * p * (dp - tl.sum(p * dp, axis=1)[:, None])
        tl.store(grad_logits_ptr + row[:, None] + cols[None, :],
                 grad.to(grad_logits_ptr.dtype.element_ty), mask=r_ok[:, None] & col_ok)

    @triton.jit
    def _outlook_bwd_values(grad_ptr, prob_ptr, grad_v_ptr, n_pixels, H, W, h, w, C,
                            HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, K: tl.constexpr,
                            STRIDE: tl.constexpr, PAD: tl.constexpr, WINDOWS: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr):
        KK: tl.constexpr = K * K
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        head = tl.program_id(1)
        pix_ok, b, y, x = _pixel_tile(n_pixels, H, W, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        channel = head * HEAD_DIM + d

        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
        for a in range(WINDOWS):
            for c in range(WINDOWS):
                # a window holding (y, x) at key place q: every query place's weight on it
                ok, iy, ix, qi, qj = _covering_window(pix_ok, y, x, a, c, h, w, K, STRIDE, PAD)
                window = (((b * h + iy) * w + ix) * HEADS + head) * KK
                for pos in range(KK):
                    dst_ok, at = _window_pixel(ok, b, iy, ix, pos, H, W, C, K, STRIDE, PAD)
                    p = tl.load(prob_ptr + (window + pos).to(tl.int64) * KK + qi * K + qj, mask=dst_ok,
                                other=0.).to(ACC)
                    g = tl.load(grad_ptr + at[:, None] + channel[None, :],
                                mask=dst_ok[:, None] & d_ok[None, :], other=0.).to(ACC)
                    acc += p[:, None] * g
        dst = ((b * H + y) * W + x).to(tl.int64) * C
        tl.store(grad_v_ptr + dst[:, None] + channel[None, :], acc.to(grad_v_ptr.dtype.element_ty),
                 mask=pix_ok[:, None] & d_ok[None, :])

    _KERNELS = {'fwd': _outlook_fwd, 'bwd_logits': _outlook_bwd_logits, 'bwd_values': _outlook_bwd_values}

    # the interpreter runs one program at a time in NumPy: wide blocks amortise its per-op cost
    BLOCK_PIXELS = 512 if interpreting() else 32

    def _common_meta(v, heads, kernel_size, stride, padding):
        head_dim = v.shape[-1] // heads
        return dict(HEADS=heads, HEAD_DIM=head_dim, K=kernel_size, STRIDE=stride, PAD=padding,
                    BLOCK_P=BLOCK_PIXELS, BLOCK_D=triton.next_power_of_2(head_dim),
                    FP64=v.dtype == torch.float64)

    def forward_launches(v, logits, out, prob, scale, kernel_size, stride, padding):
        """[(kernel name, grid, positional args, constexprs)] of the forward."""
        B, H, W, C = v.shape
        h, w, heads = logits.shape[1:4]
        n = B * H * W
        meta = dict(_common_meta(v, heads, kernel_size, stride, padding),
                    WINDOWS=math.ceil(kernel_size / stride), KK_PAD=triton.next_power_of_2(kernel_size ** 2))
        return [('fwd', (triton.cdiv(n, BLOCK_PIXELS), heads),
                 (v, logits, out, prob, scale, n, H, W, h, w, C), meta)]

    def backward_launches(grad, v, prob, grad_v, grad_logits, scale, kernel_size, stride, padding):
        """[(kernel name, grid, positional args, constexprs)] of the backward."""
        B, H, W, C = v.shape
        h, w, heads = prob.shape[1:4]
        meta = _common_meta(v, heads, kernel_size, stride, padding)
        n, rows = B * H * W, B * h * w * kernel_size ** 2
        return [
            ('bwd_logits', (triton.cdiv(rows, BLOCK_PIXELS), heads),
             (grad, v, prob, grad_logits, scale, rows, H, W, h, w, C),
             dict(meta, KK_PAD=triton.next_power_of_2(kernel_size ** 2))),
            ('bwd_values', (triton.cdiv(n, BLOCK_PIXELS), heads),
             (grad, prob, grad_v, n, H, W, h, w, C), dict(meta, WINDOWS=math.ceil(kernel_size / stride))),
        ]

    def _run(launches, device):
        for name, grid, args, meta in launches:
            kernel = _KERNELS[name]
            if device.type == 'cuda' or interpreting():
                kernel[grid](*args, **meta)
            else:
                raise RuntimeError(f'the fused outlook attention runs on CUDA, or on {device.type} in '
                                   "Triton's interpreter (TRITON_INTERPRET=1 before torch is imported)")

    def scale_tensor(scale, v):
        # a float argument would reach the kernel as fp32; fp64 inputs need the exact scale
        dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        return torch.full((1,), scale, dtype=dtype, device=v.device)

    # Opaque custom ops: torch.compile keeps them whole (no graph breaks) and needs only their shapes.
    @custom_op('volo::outlook_attention', mutates_args=())
    def _outlook_attention(v: torch.Tensor, logits: torch.Tensor, kernel_size: int, stride: int,
                           padding: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty_like(v)
        prob = torch.empty_like(logits)  # rows of query places in the padding stay unwritten and unread
        _run(forward_launches(v, logits, out, prob, scale_tensor(scale, v), kernel_size, stride, padding),
             v.device)
        return out, prob

    @custom_op('volo::outlook_attention_backward', mutates_args=())
    def _outlook_attention_backward(grad: torch.Tensor, v: torch.Tensor, prob: torch.Tensor,
                                    kernel_size: int, stride: int, padding: int,
                                    scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        grad_v = torch.empty_like(v)
        grad_logits = torch.empty_like(prob)
        _run(backward_launches(grad.contiguous(), v, prob, grad_v, grad_logits, scale_tensor(scale, v),
                               kernel_size, stride, padding), v.device)
        return grad_v, grad_logits

    @_outlook_attention.register_fake
    def _(v, logits, kernel_size, stride, padding, scale):
        return torch.empty_like(v), torch.empty_like(logits)

    @_outlook_attention_backward.register_fake
    def _(grad, v, prob, kernel_size, stride, padding, scale):
        return torch.empty_like(v), torch.empty_like(prob)

    def _setup_context(ctx, inputs, output):
        v, _, kernel_size, stride, padding, scale = inputs
        ctx.save_for_backward(v, output[1])
        ctx.geometry = (kernel_size, stride, padding, scale)

    def _backward(ctx, grad_out, grad_prob):
        v, prob = ctx.saved_tensors
        grad_v, grad_logits = _outlook_attention_backward(grad_out, v, prob, *ctx.geometry)
        return grad_v, grad_logits, None, None, None, None

    _outlook_attention.register_autograd(_backward, setup_context=_setup_context)


def outlook_attention_fused(v: torch.Tensor, logits: torch.Tensor, kernel_size: int, stride: int,
                            padding: int, scale: float) -> torch.Tensor:
    """fold(softmax(scale * logits) @ unfold(v)) for v (B, H, W, C) and logits
    (B, h, w, heads, k*k, k*k); see the module docstring."""
    if triton is None:
        raise RuntimeError('the fused outlook attention needs triton (pip install triton)')
    B, H, W, C = v.shape
    kk = kernel_size ** 2
    if logits.dim() != 6 or logits.shape[0] != B or logits.shape[4:] != (kk, kk) or C % logits.shape[3]:
        raise ValueError(f'logits of shape {tuple(logits.shape)} do not fit values of shape {tuple(v.shape)} '
                         f'and kernel_size {kernel_size}: expected (B, h, w, heads, {kk}, {kk})')
    if scale <= 0:
        raise ValueError(f'scale must be positive, got {scale}')
    out, _ = _outlook_attention(v.contiguous(), logits.to(v.dtype).contiguous(),
                                kernel_size, stride, padding, float(scale))
    return out


_SELF_CHECKS = {}


def fused_kernels_work(device: torch.device) -> bool:
    """Whether the fused kernels compile and agree with the PyTorch path on `device`: checked once
    per device on a small problem (forward and both gradients), with a warning when they do not."""
    key = (device.type, device.index)
    if key not in _SELF_CHECKS:
        if torch.compiler.is_compiling():
            return triton is not None  # no kernels run while tracing; failures surface at compile
        _SELF_CHECKS[key] = _self_check(device)
    return _SELF_CHECKS[key]


def _self_check(device):
    if triton is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(2, 5, 6, 64, generator=gen, dtype=torch.float64)
        logits = torch.randn(2, 3, 3, 2, 9, 9, generator=gen, dtype=torch.float64)
        grad = torch.randn(2, 5, 6, 64, generator=gen, dtype=torch.float64)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            v_dev, logits_dev = (t.float().to(device).requires_grad_() for t in (v, logits))
            out = outlook_attention_fused(v_dev, logits_dev, 3, 2, 1, 0.5)
            got = (out, *torch.autograd.grad(out, (v_dev, logits_dev), grad.float().to(device)))
            v.requires_grad_()
            logits.requires_grad_()
            ref = outlook_aggregate(v, (logits * 0.5).softmax(dim=-1), 3, 2, 1)
            want = (ref, *torch.autograd.grad(ref, (v, logits), grad))
        error = max((a.double().cpu() - b).abs().max().item() for a, b in zip(got, want))
        if error <= 1e-4:
            return True
        problem = f'differ from the PyTorch path by {error:.1e}'
    except Exception as e:  # any failure to compile or launch means: use the PyTorch path
        problem = f'failed ({type(e).__name__}: {e})'
    warnings.warn(f'the fused outlook attention kernels {problem} on {device}; VOLO uses the PyTorch '
                  "path there (outlook_impl='torch' silences this)")
    return False


if triton is not None:
    register_fused_impl('triton', outlook_attention_fused, fused_kernels_work)
