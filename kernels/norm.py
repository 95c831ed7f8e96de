"""RMSNorm, optionally fused with the residual add: r = x + residual; out = r / rms(r) * weight.

Math in float32; r is rounded to x.dtype first (as the residual stream is stored) and that rounded
value is normalised, so out and residual_out agree with an unfused add-then-norm.
Per-head norms (Qwen3 q/k norm) pass x viewed as [T * heads, head_dim].
NOTE: rows are short (head_dim 128) to long (hidden 3584); each program takes ROWS rows so that a
program holds about MAX_TILE elements either way.
"""
import torch
import triton
import triton.language as tl

MAX_TILE = 4096


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, n_rows, hidden, eps,
                     x_stride, residual_stride, out_stride, residual_out_stride,
                     HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None].to(tl.int64)
    cols = tl.arange(0, BLOCK_H)[None, :]
    mask = (rows < n_rows) & (cols < hidden)
    x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + rows * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + rows * residual_out_stride + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * out_stride + cols, (x * inv_rms[:, None] * weight).to(out_ptr.dtype.element_ty),
             mask=mask)


def _outputs(x, residual, out):
    if out is not None:
        return out
    return torch.empty_like(x) if residual is None else (torch.empty_like(x), torch.empty_like(x))


def rms_norm(x, weight, eps: float, residual=None, out=None):
    """x [N, H] (unit last stride) -> out, or (out, residual_out) when residual is given;
    `out` has the same structure as the result (a tensor, or a pair with a residual)."""
    n_rows, hidden = x.shape
    result = _outputs(x, residual, out)
    normed, residual_out = result if residual is not None else (result, result)
    assert x.stride(-1) == 1 and normed.stride(-1) == 1 and residual_out.stride(-1) == 1
    if n_rows == 0:
        return result
    block_h = triton.next_power_of_2(hidden)
    rows = max(1, min(16, MAX_TILE // block_h))
    res = residual if residual is not None else x
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, res, weight, normed, residual_out, n_rows, hidden, eps,
        x.stride(0), res.stride(0), normed.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_H=block_h, num_warps=4 if block_h <= 1024 else 8)
    return result


def rms_norm_ref(x, weight, eps: float, residual=None, out=None):
    """Plain torch, same math and rounding points."""
    result = _outputs(x, residual, out)
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        result[1].copy_(x)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    (result[0] if residual is not None else result).copy_(normed)
    return result
