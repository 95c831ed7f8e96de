"""Counter-based random numbers shared by the Triton kernels and the torch references.

A value depends only on (seed, pos, col, stream), never on the launch or the batch a row sits in,
so a row samples the same token alone or batched, on the GPU or in the torch reference.
Streams (rstitch_engine.protocol.Stream), one per consumer, so no two draw the same numbers:
  0 STITCH         stitch-step sampling, Gumbel-max over the row (stitch_step.py)
  1 SPEC_ACCEPT    speculative verification: accept draft j with min(1, q/p), and the forced acceptance of
                   `accept_rate` in benchmarks (spec_verify.py)
  2 SPEC_RESAMPLE  speculative verification: Gumbel noise to resample the first rejected position
  3 ROUTER         R-Stitch+ router: sampled keep/switch decisions at temperature > 0 (router/device.py)

    mix32(x)  = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16   (uint32)
    hash_u32  = mix32(mix32(mix32(seed ^ (stream * 0x9E3779B9)) ^ pos) ^ col)
    uniform   = ((hash >> 9) + 0.5) * 2**-23      in (0, 1), exact in float32
    gumbel    = -log(-log(uniform))

NOTE: the top 23 bits, not 24: ((h >> 8) + 0.5) * 2**-24 needs 25 significant bits and rounds to
exactly 1.0 in float32 for h >> 8 == 2**24 - 1, which would give a +inf Gumbel value. With 23 bits
every uniform is an exact float32 in [2**-24, 1 - 2**-24], so torch and Triton agree bit-for-bit.
"""
import torch
import triton
import triton.language as tl

_U32 = 0xFFFFFFFF
UNIFORM_SHIFT = tl.constexpr(9)
UNIFORM_SCALE = tl.constexpr(2.0 ** -23)


# ---------------------------------------------------------------- Triton device functions

@triton.jit
def mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7feb352d
    x = x ^ (x >> 15)
    x = x * 0x846ca68b
    return x ^ (x >> 16)


@triton.jit
def hash_u32(seed, pos, col, STREAM: tl.constexpr):
    """uint32 hash; seed/pos/col are integer scalars or tensors (truncated to 32 bits)."""
    h = mix32(seed.to(tl.uint32) ^ ((STREAM * 0x9E3779B9) & 0xFFFFFFFF))
    h = mix32(h ^ pos.to(tl.uint32))
    return mix32(h ^ col.to(tl.uint32))


@triton.jit
def uniform_from_hash(h):
    return ((h >> UNIFORM_SHIFT).to(tl.float32) + 0.5) * UNIFORM_SCALE


@triton.jit
def gumbel_from_hash(h):
    return -tl.log(-tl.log(uniform_from_hash(h)))


# ---------------------------------------------------------------- torch versions (bit-identical)

def mix32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7feb352d) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846ca68b) & _U32
    return x ^ (x >> 16)


def hash_u32_torch(seed: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, stream: int) -> torch.Tensor:
    """Broadcasting int64 hash in [0, 2**32); same value as the Triton hash_u32."""
    h = mix32_torch(seed.long() ^ ((stream * 0x9E3779B9) & _U32))
    h = mix32_torch(h ^ (pos.long() & _U32))
    return mix32_torch(h ^ (col.long() & _U32))


def uniform_noise(seed: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor, stream: int) -> torch.Tensor:
    """[L] seeds, [L] positions, [C] column ids -> [L, C] float32 uniforms in (0, 1)."""
    h = hash_u32_torch(seed[:, None], pos[:, None], cols[None, :], stream)
    return ((h >> UNIFORM_SHIFT.value).float() + 0.5) * UNIFORM_SCALE.value


def gumbel_noise(seed: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor, stream: int) -> torch.Tensor:
    """[L, C] float32 standard Gumbel noise, -log(-log(uniform_noise(...)))."""
    return -torch.log(-torch.log(uniform_noise(seed, pos, cols, stream)))
