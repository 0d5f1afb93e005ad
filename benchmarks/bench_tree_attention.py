"""Tree attention at GPT-2's decode shape: 64 tree tokens, 12 heads of 64, fp16, over a
cached prefix of 512 and 2048, against eager SDPA with the equivalent dense boolean mask
(what the model runs without the kernel). Target on an H100 (ANCHORS.md): <= 15 us over 512,
where eager SDPA with a dense mask takes 70 us."""

import pytest
import torch
import torch.nn.functional as F

from mtpkern.ops.tree_attention import dense_tree_mask, pack_tree_mask, tree_attention

pytestmark = pytest.mark.gpu

B, H, T, DH = 1, 12, 64, 64


def _tree(T: int) -> torch.Tensor:
    """A 64-node tree: node i's parent is a random earlier node; mask = ancestors and self."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[int(torch.randint(0, i, (1,), generator=gen))]
    return mask


@pytest.mark.parametrize("prefix", [512, 2048])
def test_tree_attention(benchmark, bench_against, prefix):
    S = prefix + T
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, DH, device="cuda", dtype=torch.float16, generator=gen).transpose(1, 2)
    k_cache = torch.randn(B, H, S, DH, device="cuda", dtype=torch.float16, generator=gen)
    v_cache = torch.randn(B, H, S, DH, device="cuda", dtype=torch.float16, generator=gen)
    prefix_len = torch.tensor(prefix, device="cuda")
    packed = pack_tree_mask(_tree(T)).cuda()
    dense = dense_tree_mask(prefix_len, packed, S)
    # K and V of the prefix and the tree, q in, out back, the packed mask.
    bytes_moved = 2 * B * H * S * DH * 2 + 2 * B * H * T * DH * 2 + packed.numel() * 4
    bench_against(
        benchmark,
        lambda: tree_attention(q, k_cache, v_cache, prefix_len, packed, backend="triton"),
        lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=dense),
        bytes_moved=bytes_moved,
        T=T, H=H, head_dim=DH, prefix=prefix, dtype="float16",
    )
