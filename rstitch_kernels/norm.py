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
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, src_rows_ptr, n_rows, hidden, eps,
                     x_stride, residual_stride, out_stride, residual_out_stride,
                     HAS_RESIDUAL: tl.constexpr, WRITE_RESIDUAL: tl.constexpr, GATHER: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None].to(tl.int64)
    cols = tl.arange(0, BLOCK_H)[None, :]
    mask = (rows < n_rows) & (cols < hidden)
    src = tl.load(src_rows_ptr + rows, mask=rows < n_rows, other=0).to(tl.int64) if GATHER else rows
    x = tl.load(x_ptr + src * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + src * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty)
        if WRITE_RESIDUAL:
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


def _launch(x, weight, eps, residual, normed, residual_out, src_rows):
    n_rows, hidden = normed.shape
    assert x.stride(-1) == 1 and normed.stride(-1) == 1 and (residual_out is None or residual_out.stride(-1) == 1)
    if n_rows == 0:
        return
    block_h = triton.next_power_of_2(hidden)
    rows = max(1, min(16, MAX_TILE // block_h))
    res = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else normed
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, res, weight, normed, res_out, src_rows if src_rows is not None else x, n_rows, hidden, eps,
        x.stride(0), res.stride(0), normed.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, WRITE_RESIDUAL=residual_out is not None, GATHER=src_rows is not None,
        ROWS=rows, BLOCK_H=block_h, num_warps=4 if block_h <= 1024 else 8)


def rms_norm(x, weight, eps: float, residual=None, out=None):
    """x [N, H] (unit last stride) -> out, or (out, residual_out) when residual is given;
    `out` has the same structure as the result (a tensor, or a pair with a residual)."""
    result = _outputs(x, residual, out)
    normed, residual_out = result if residual is not None else (result, None)
    _launch(x, weight, eps, residual, normed, residual_out, None)
    return result


def rms_norm_rows(x, weight, eps: float, residual, rows):
    """The norm of rows `rows` of x + residual only, [len(rows), H]: the final norm of the rows that
    decide a token, gathered in the same launch."""
    normed = torch.empty((rows.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    _launch(x, weight, eps, residual, normed, None, rows)
    return normed


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


def rms_norm_rows_ref(x, weight, eps: float, residual, rows):
    """Plain torch: the rows gathered, then rms_norm_ref."""
    rows = rows.long()
    if residual is None:
        return rms_norm_ref(x[rows], weight, eps)
    return rms_norm_ref(x[rows], weight, eps, residual[rows])[0]
