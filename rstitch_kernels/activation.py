"""SwiGLU gate: silu(x[:, :I]) * x[:, I:], math in float32."""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, x_stride, out_stride, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + token * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + token * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x, out=None):
    """x [T, 2I] (unit last stride) -> [T, I]."""
    num_tokens, width = x.shape
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device) if out is None else out
    assert x.stride(-1) == 1 and out.stride(-1) == 1
    if num_tokens == 0:
        return out
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, BLOCK))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


def silu_and_mul_ref(x, out=None):
    gate, up = x.float().chunk(2, dim=-1)
    result = torch.nn.functional.silu(gate) * up
    out = torch.empty(result.shape, dtype=x.dtype, device=x.device) if out is None else out
    return out.copy_(result)
