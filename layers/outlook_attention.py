"""Outlook attention (VOLO's stage-1 token mixer): the PyTorch path, the module, and the one
function that picks the implementation (PyTorch, the fused Triton kernels, or the export path).

Windows are gathered with strided slices and scattered back with strided adds instead of
unfold/fold: the same function, cheaper on CPU and GPU, and exportable to ONNX without Col2Im.

TorchScript takes the plain path (softmax, window copies and adds, no custom autograd functions);
FX sees `apply_outlook_attention` and `pool_ceil` as single calls (torch.fx.wrap, and timm's
notrace registry for timm's tracers), so traced graphs run the same code as eager.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import register_notrace_function

from .helpers import exporting, needs_grad

__all__ = ['OutlookAttention', 'apply_outlook_attention', 'outlook_aggregate', 'OUTLOOK_IMPLS', 'register_fused_impl']


def zero_pad_hw(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad H and W of a (B, H, W, C) map. When exporting, by concatenation: ONNX's converter has
    no opset 18 -> 17 adapter for Pad, and the exporter only writes opset 18."""
    if padding == 0:
        return x
    if torch.jit.is_scripting():
        return F.pad(x, [0, 0, padding, padding, padding, padding])
    if not exporting():
        return F.pad(x, (0, 0, padding, padding, padding, padding))
    B, H, W, C = x.shape
    rows = x.new_zeros(B, padding, W, C)
    x = torch.cat([rows, x, rows], dim=1)
    cols = x.new_zeros(B, H + 2 * padding, padding, C)
    return torch.cat([cols, x, cols], dim=2)


def unfold_windows(v: torch.Tensor, num_heads: int, kernel_size: int, stride: int, padding: int,
                   out_h: int, out_w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, out_h, out_w, heads, k*k, C/heads): the k x k window of every output cell."""
    B, H, W, C = v.shape
    k = kernel_size
    v = zero_pad_hw(v, padding)
    v = v.unfold(1, k, stride).unfold(2, k, stride)[:, :out_h, :out_w]  # B,h,w,C,k,k (a view)
    v = v.reshape(B, out_h, out_w, num_heads, C // num_heads, k, k).permute(0, 1, 2, 3, 5, 6, 4)
    return v.reshape(B, out_h, out_w, num_heads, k * k, C // num_heads)


def fold_windows(y: torch.Tensor, height: int, width: int, kernel_size: int, stride: int,
                 padding: int) -> torch.Tensor:
    """(B, h, w, heads, k*k, d) -> (B, H, W, heads*d): sum every window back onto the map."""
    B, h, w, num_heads, _, head_dim = y.shape
    k, s = kernel_size, stride
    out = y.new_zeros(B, height + 2 * padding, width + 2 * padding, num_heads, head_dim)
    span_h, span_w = s * (h - 1) + 1, s * (w - 1) + 1
    for i in range(k):
        for j in range(k):
            out[:, i:i + span_h:s, j:j + span_w:s] += y[:, :, :, :, i * k + j]
    out = out[:, padding:padding + height, padding:padding + width]
    return out.reshape(B, height, width, num_heads * head_dim)


class _UnfoldWindows(torch.autograd.Function):
    """unfold_windows with its adjoint, fold_windows, as the backward."""

    @staticmethod
    def forward(ctx, v, num_heads, kernel_size, stride, padding, out_h, out_w):
        ctx.geometry = (v.shape[1], v.shape[2], kernel_size, stride, padding)
        return unfold_windows(v, num_heads, kernel_size, stride, padding, out_h, out_w)

    @staticmethod
    def backward(ctx, grad):
        return _FoldWindows.apply(grad, *ctx.geometry), None, None, None, None, None, None


class _FoldWindows(torch.autograd.Function):
    """fold_windows with its adjoint, unfold_windows, as the backward. Autograd through the
    in-place strided adds would clone and zero the whole map once per window offset."""

    @staticmethod
    def forward(ctx, y, height, width, kernel_size, stride, padding):
        ctx.geometry = (y.shape[3], kernel_size, stride, padding, y.shape[1], y.shape[2])
        return fold_windows(y, height, width, kernel_size, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        return _UnfoldWindows.apply(grad, *ctx.geometry), None, None, None, None, None


def softmax_small(x: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(x * scale) over a short last dimension (k*k = 9): on CPU, PyTorch's softmax kernel
    is several times slower for such rows than these elementwise passes."""
    e = torch.sub(x, x.amax(dim=-1, keepdim=True)).mul_(scale).exp_()  # scale > 0 keeps the argmax
    return e.div_(e.sum(dim=-1, keepdim=True))


class _SoftmaxSmall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        y = softmax_small(x, scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        grad_y = grad * y
        dot = grad_y.sum(dim=-1, keepdim=True)
        return grad_y.addcmul_(y, dot, value=-1.).mul_(ctx.scale), None


def outlook_softmax(x, scale):
    if x.is_cuda or exporting():  # one Softmax node in exported graphs
        return (x * scale).softmax(dim=-1)
    if needs_grad(x):
        return _SoftmaxSmall.apply(x, scale)
    return softmax_small(x, scale)


def outlook_unfold(v, num_heads, kernel_size, stride, padding, out_h, out_w):
    if needs_grad(v):
        return _UnfoldWindows.apply(v, num_heads, kernel_size, stride, padding, out_h, out_w)
    return unfold_windows(v, num_heads, kernel_size, stride, padding, out_h, out_w)


def outlook_fold(y, height, width, kernel_size, stride, padding):
    if needs_grad(y):
        return _FoldWindows.apply(y, height, width, kernel_size, stride, padding)
    return fold_windows(y, height, width, kernel_size, stride, padding)


def outlook_aggregate(v, attn, kernel_size, stride, padding):
    """fold(attn @ unfold(v)) for values v (B, H, W, C) and window attention probabilities
    attn (B, h, w, heads, k*k, k*k): (B, H, W, C)."""
    H, W = v.shape[1:3]
    k = kernel_size
    h, w, heads = attn.shape[1:4]
    v = outlook_unfold(v, heads, k, stride, padding, h, w)  # B,h,w,heads,kk,d
    # 3-D bmm: N-D matmul broadcasting is several times slower for these 9x9 @ 9xd products
    x = torch.bmm(attn.reshape(-1, k * k, k * k), v.reshape(-1, k * k, v.shape[-1])).view(v.shape)
    return outlook_fold(x, H, W, k, stride, padding)


# The fused implementation registers itself here when layers.outlook_triton is imported:
# (apply(v, logits, kernel_size, stride, padding, scale), works_on(device) -> bool).
_FUSED = {}


def register_fused_impl(name, apply, works_on):
    _FUSED[name] = (apply, works_on)


def apply_outlook_attention(v: torch.Tensor, logits: torch.Tensor, kernel_size: int, stride: int, padding: int,
                            scale: float, impl: str = 'auto', attn_drop: float = 0.) -> torch.Tensor:
    """fold(dropout(softmax(scale * logits)) @ unfold(v)): the one place that picks the implementation.

    impl 'torch': strided window copies and adds (any device, exportable); 'triton': the fused kernels
    of layers/outlook_triton.py; 'auto': Triton on CUDA when it is installed and passes a one-time
    self-check on the device, else 'torch'. Exporting, and attention dropout, always take 'torch'.
    """
    if torch.jit.is_scripting():  # an FX graph being scripted calls this function
        return outlook_attention_plain(v, logits, kernel_size, stride, padding, scale, attn_drop)
    else:
        return _apply_chosen(v, logits, kernel_size, stride, padding, scale, impl, attn_drop)


def _apply_chosen(v, logits, kernel_size, stride, padding, scale, impl, attn_drop):
    if impl not in OUTLOOK_IMPLS:
        raise ValueError(f'outlook_impl must be one of {OUTLOOK_IMPLS}, got {impl!r}')
    use_fused = impl == 'triton'
    if impl == 'auto' and v.is_cuda and not attn_drop and 'triton' in _FUSED:
        use_fused = _FUSED['triton'][1](v.device)
    if use_fused and not exporting():
        if attn_drop:
            raise ValueError("outlook_impl='triton' has no attention dropout; use attn_drop=0 or 'auto'")
        if 'triton' not in _FUSED:
            raise RuntimeError('the fused outlook attention needs triton (pip install triton)')
        return _FUSED['triton'][0](v, logits, kernel_size, stride, padding, scale)
    attn = outlook_softmax(logits, scale)
    if attn_drop:
        attn = F.dropout(attn, attn_drop, training=True)
    return outlook_aggregate(v, attn, kernel_size, stride, padding)


OUTLOOK_IMPLS = ('auto', 'triton', 'torch')


def outlook_attention_plain(v: torch.Tensor, logits: torch.Tensor, kernel_size: int, stride: int, padding: int,
                            scale: float, attn_drop: float = 0.) -> torch.Tensor:
    """apply_outlook_attention's function in plain tensor ops (TorchScript's path)."""
    attn = (logits * scale).softmax(dim=-1)
    if attn_drop > 0.:
        attn = F.dropout(attn, attn_drop, training=True)
    H, W = v.shape[1], v.shape[2]
    k = kernel_size
    h, w, heads = attn.shape[1], attn.shape[2], attn.shape[3]
    windows = unfold_windows(v, heads, k, stride, padding, h, w)
    x = torch.bmm(attn.reshape(-1, k * k, k * k), windows.reshape(-1, k * k, windows.shape[-1]))
    return fold_windows(x.view(windows.shape), H, W, k, stride, padding)


def pool_ceil(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average pooling of a (B, C, H, W) map over stride x stride cells, in ceil mode: cells past the
    edge average their in-map pixels."""
    H, W = x.shape[-2], x.shape[-1]
    s = stride
    if H % s == 0 and W % s == 0:
        return F.avg_pool2d(x, s, s)
    # explicit for the edge cells: inductor's avg_pool2d backward divides them by s*s
    # (pytorch/pytorch#198119)
    pad = [0, -W % s, 0, -H % s]
    inside = F.avg_pool2d(F.pad(x.new_ones(1, 1, H, W), pad), s, s)
    return F.avg_pool2d(F.pad(x, pad), s, s) / inside


def windows_match_cells(kernel_size: int, stride: int, padding: int) -> bool:
    """Whether every map size gives as many k x k windows as ceil-mode pooled cells. The difference
    of the two counts repeats with period `stride` in the map size, so one period decides it."""
    k, s, p = kernel_size, stride, padding
    return all((n + 2 * p - k) // s + 1 == -(-n // s) for n in range(1, s + 1))


for _fn in (apply_outlook_attention, pool_ceil):
    register_notrace_function(_fn)
torch.fx.wrap('apply_outlook_attention')
torch.fx.wrap('pool_ceil')


class OutlookAttention(nn.Module):
    """Each output cell predicts, from the pooled input, a k^2 x k^2 attention over its window.

    outlook_impl: 'torch' strided window copies and adds (any device, exportable); 'triton' the fused
    kernels of models/outlook_triton.py; 'auto' (default) Triton on CUDA when it is installed and
    passes a one-time self-check on the device, else 'torch'. Exporting always takes 'torch'.
    """

    def __init__(self, dim, num_heads, kernel_size=3, padding=1, stride=1, qkv_bias=False,
                 qk_scale=None, attn_drop=0., proj_drop=0., outlook_impl='auto'):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if outlook_impl not in OUTLOOK_IMPLS:
            raise ValueError(f'outlook_impl must be one of {OUTLOOK_IMPLS}, got {outlook_impl!r}')
        if outlook_impl == 'triton' and attn_drop > 0:
            raise ValueError("outlook_impl='triton' has no attention dropout; use attn_drop=0 or 'auto'")
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = qk_scale or head_dim ** -0.5
        self.outlook_impl = outlook_impl

        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # VOLO's geometry (3, 2, 1) always matches; others are checked on every input
        self.check_grid = not windows_match_cells(kernel_size, stride, padding)

    def _check_grid(self, H: int, W: int):
        k, s, p = self.kernel_size, self.stride, self.padding
        rows, cols = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        if rows != (H + s - 1) // s or cols != (W + s - 1) // s:
            raise ValueError(
                'OutlookAttention(kernel_size={}, stride={}, padding={}) needs as many windows as pooled cells; '
                'a {}x{} map gives {}x{} windows and {}x{} cells'.format(
                    k, s, p, H, W, rows, cols, (H + s - 1) // s, (W + s - 1) // s))

    def forward(self, x):
        B, H, W, C = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        if self.check_grid:
            self._check_grid(H, W)

        v = self.v(x)
        attn = pool_ceil(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
        attn = self.attn(attn).reshape(B, attn.shape[1], attn.shape[2], self.num_heads, k * k, k * k)
        attn_drop = self.attn_drop.p if self.training else 0.
        x = apply_outlook_attention(v, attn, k, s, p, self.scale, impl=self.outlook_impl, attn_drop=attn_drop)
        x = self.proj(x)
        return self.proj_drop(x)
