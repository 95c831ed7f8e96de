"""store_kv against store_kv_ref: exact copies, padding slots skipped, nothing else touched."""
import pytest
import torch

from kernel_test_utils import DEVICE, randn
from rstitch_engine.kernels import store_kv, store_kv_ref


def check_store(num_tokens, num_kv_heads, head_dim, page, dtype, num_blocks, strided=False):
    gen = torch.Generator().manual_seed(num_tokens + head_dim)
    k_cache = randn(num_blocks, page, num_kv_heads, head_dim, dtype=dtype, generator=gen)
    v_cache = randn(num_blocks, page, num_kv_heads, head_dim, dtype=dtype, generator=gen)
    width = num_kv_heads * head_dim
    if strided:  # K and V as views into a fused qkv projection output
        qkv = randn(num_tokens, 3 * width, dtype=dtype, generator=gen)
        key = qkv[:, width:2 * width].view(num_tokens, num_kv_heads, head_dim)
        value = qkv[:, 2 * width:].view(num_tokens, num_kv_heads, head_dim)
    else:
        key = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, generator=gen)
        value = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, generator=gen)
    slots = torch.randperm(num_blocks * page, generator=gen)[:num_tokens]
    slots[::4] = -1  # padding
    slot_mapping = slots.int().to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slot_mapping)
    store_kv_ref(key, value, k_ref, v_ref, slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = slots[slots >= 0]
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[written.to(DEVICE)], key[slot_mapping >= 0])


@pytest.mark.parametrize("num_tokens, num_kv_heads, head_dim, page, dtype, strided", [
    (1, 1, 16, 8, torch.float32, False),
    (17, 2, 32, 16, torch.bfloat16, True),
    (40, 3, 64, 64, torch.float16, False),
    (9, 8, 128, 32, torch.float32, True),
])
def test_store_kv(num_tokens, num_kv_heads, head_dim, page, dtype, strided):
    check_store(num_tokens, num_kv_heads, head_dim, page, dtype, num_blocks=-(-num_tokens // page) + 3,
                strided=strided)


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens", [1, 256, 4096])
def test_store_kv_real_shapes_cuda(num_tokens):
    check_store(num_tokens, 4, 128, 16, torch.bfloat16, num_blocks=2048, strided=True)
