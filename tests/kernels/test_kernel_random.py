"""The counter-based hash: Triton and torch bit-identical; uniforms look uniform; Gumbel moments."""
import math

import pytest
import torch
import triton
import triton.language as tl

from kernel_test_utils import DEVICE
from rstitch_engine.kernels import gumbel_noise, uniform_noise
from rstitch_engine.kernels.random import gumbel_from_hash, hash_u32, hash_u32_torch, uniform_from_hash


@triton.jit
def _noise_kernel(seed_ptr, pos_ptr, cols_ptr, hash_ptr, uniform_ptr, gumbel_ptr, n_cols,
                  STREAM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    mask = idx < n_cols
    cols = tl.load(cols_ptr + idx, mask=mask)
    h = hash_u32(tl.load(seed_ptr + row), tl.load(pos_ptr + row), cols, STREAM)
    out = row * n_cols + idx
    tl.store(hash_ptr + out, h.to(tl.int64), mask=mask)
    tl.store(uniform_ptr + out, uniform_from_hash(h), mask=mask)
    tl.store(gumbel_ptr + out, gumbel_from_hash(h), mask=mask)


def triton_noise(seed, pos, cols, stream):
    n_rows, n_cols = seed.shape[0], cols.shape[0]
    hashes = torch.empty(n_rows, n_cols, dtype=torch.int64, device=DEVICE)
    uniform, gumbel = (torch.empty(n_rows, n_cols, device=DEVICE) for _ in range(2))
    _noise_kernel[(n_rows,)](seed, pos, cols, hashes, uniform, gumbel, n_cols,
                             STREAM=stream, BLOCK=triton.next_power_of_2(n_cols))
    return hashes, uniform, gumbel


@pytest.mark.parametrize("stream", [0, 1, 2])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_triton_and_torch_agree_bit_for_bit(stream, index_dtype):
    gen = torch.Generator().manual_seed(stream)
    seed = torch.cat([torch.tensor([0, 1, -1, 2 ** 62 + 12345]), torch.randint(-2 ** 62, 2 ** 62, (4,), generator=gen)])
    pos = torch.cat([torch.tensor([0, 2 ** 31 - 1, 7, 123]), torch.randint(0, 2 ** 31 - 1, (4,), generator=gen)])
    seed, pos = seed.to(DEVICE), pos.to(index_dtype).to(DEVICE)
    cols = torch.cat([torch.arange(200), torch.tensor([152063, 2 ** 31 - 1])]).int().to(DEVICE)
    hashes, uniform, gumbel = triton_noise(seed, pos, cols, stream)
    expected = hash_u32_torch(seed[:, None], pos[:, None], cols[None, :], stream)
    assert torch.equal(hashes, expected)
    assert ((0 <= expected) & (expected < 2 ** 32)).all()
    assert torch.equal(uniform, uniform_noise(seed, pos, cols, stream))
    torch.testing.assert_close(gumbel, gumbel_noise(seed, pos, cols, stream), rtol=1e-6, atol=1e-6)


def test_mix32_known_values():
    """mix32 spelled out by hand in Python integers for a few inputs."""
    def mix32(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7feb352d) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846ca68b) & 0xFFFFFFFF
        return x ^ (x >> 16)

    for seed, pos, col, stream in [(0, 0, 0, 0), (5, 9, 77, 1), (2 ** 40 + 3, 2 ** 31 - 1, 151935, 2)]:
        want = mix32(mix32(mix32(seed ^ ((stream * 0x9E3779B9) & 0xFFFFFFFF)) ^ pos) ^ col)
        got = hash_u32_torch(torch.tensor(seed), torch.tensor(pos), torch.tensor(col), stream)
        assert got.item() == want


def test_uniforms_look_uniform():
    seed = torch.arange(64, device=DEVICE) * 1000003
    pos = torch.arange(64, device=DEVICE) % 5
    u = uniform_noise(seed, pos, torch.arange(4096, device=DEVICE), 0).flatten().double()
    n = u.numel()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    counts = torch.histc(u, bins=16, min=0, max=1)
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum().item()
    assert chi2 < 45.0  # 15 dof: p ~ 1e-4
    g = gumbel_noise(seed, pos, torch.arange(4096, device=DEVICE), 0).double()
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.03


def test_streams_and_counters_decorrelate():
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    cols = torch.arange(20000, device=DEVICE)
    u = [uniform_noise(seed, pos, cols, s).flatten().double() for s in (0, 1, 2)]
    u.append(uniform_noise(seed, pos + 1, cols, 0).flatten().double())
    u.append(uniform_noise(seed + 1, pos, cols, 0).flatten().double())
    for i in range(len(u)):
        for j in range(i):
            assert abs(torch.corrcoef(torch.stack([u[i], u[j]]))[0, 1].item()) < 0.03
