"""Shared helpers of the kernel tests: error metric, poisoning, paged-KV fixtures, the test device."""
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
# CPU tests run the kernels under the Triton interpreter (see conftest.py); on a GPU machine they run on it.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere fails."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    assert torch.isfinite(ref).all(), "non-finite values in the reference"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOLERANCE[dtype or out.dtype]
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"


def assert_same_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-equal on a GPU. NOTE: the triton 3.6 interpreter truncates float32 -> bf16/fp16 instead of
    rounding to nearest, so on the CPU a last-bit difference is allowed."""
    if HAS_CUDA or out.dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert_close(out, ref)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or a sentinel (ints) so that unwritten elements show."""
    return t.fill_(float("nan") if t.is_floating_point() else -12345)


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, generator=None) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(dtype=dtype, device=device)


class PagedKV:
    """Random per-row contiguous K/V ([R, Hkv, L_r, D]) scattered into a pool through a shuffled block
    assignment; rows use shuffled sequence slots. Unused pool blocks hold NaN, table entries past a
    row's end point at NaN blocks: reading anything outside the context shows up as NaN."""

    def __init__(self, seq_lens, num_kv_heads, head_dim, page, dtype, device=DEVICE, seed=0, spare_blocks=3):
        gen = torch.Generator().manual_seed(seed)
        self.seq_lens_list = list(seq_lens)
        rows = len(self.seq_lens_list)
        blocks_per_row = [-(-n // page) for n in self.seq_lens_list]
        max_blocks = max(max(blocks_per_row), 1) + 1
        num_blocks = sum(blocks_per_row) + spare_blocks
        shape = (num_blocks, page, num_kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
        order = torch.randperm(num_blocks, generator=gen).tolist()
        nan_blocks = order[sum(blocks_per_row):]
        num_slots = rows + 2
        self.seq_slot = torch.randperm(num_slots, generator=gen)[:rows].int()
        self.block_tables = torch.tensor(nan_blocks, dtype=torch.int32)[
            torch.randint(len(nan_blocks), (num_slots, max_blocks), generator=gen)]
        self.keys, self.values = [], []
        for r, n in enumerate(self.seq_lens_list):
            own = [order.pop(0) for _ in range(blocks_per_row[r])]
            self.block_tables[self.seq_slot[r], :len(own)] = torch.tensor(own, dtype=torch.int32)
            k = torch.randn(num_kv_heads, n, head_dim, generator=gen).to(dtype)
            v = torch.randn(num_kv_heads, n, head_dim, generator=gen).to(dtype)
            t = torch.arange(n)
            where = (torch.tensor(own, dtype=torch.long)[t // page], t % page)
            self.k_cache[where] = k.transpose(0, 1)
            self.v_cache[where] = v.transpose(0, 1)
            self.keys.append(k.to(device))
            self.values.append(v.to(device))
        self.k_cache, self.v_cache = self.k_cache.to(device), self.v_cache.to(device)
        self.block_tables, self.seq_slot = self.block_tables.to(device), self.seq_slot.to(device)
        self.seq_lens = torch.tensor(self.seq_lens_list, dtype=torch.int32, device=device)


def dense_attention(q_rows, keys, values, q_positions, scale):
    """Causal SDPA per row on contiguous K/V, in float64: q_rows[r] [n_r, Hq, D] at q_positions[r]."""
    outs = []
    for q, k, v, pos in zip(q_rows, keys, values, q_positions):
        visible = torch.arange(k.shape[1], device=q.device)[None, :] <= pos[:, None].to(q.device)
        outs.append(F.scaled_dot_product_attention(
            q.double().transpose(0, 1), k.double(), v.double(), attn_mask=visible, scale=scale,
            enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)
