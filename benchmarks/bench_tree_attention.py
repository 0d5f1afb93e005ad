"""Tree attention at GPT-2's decode shape: 64 tree tokens, 12 heads of 64, fp16, over a
cached prefix of 512 and 2048, against eager SDPA with the equivalent dense boolean mask
(what the model runs without the kernel). Target on an H100 (ANCHORS.md): <= 15 us over 512,
where eager SDPA with a dense mask takes 70 us."""

import pytest
import torch
import torch.nn.functional as F

from mtpkern.ops.tree_attention import dense_tree_mask, pack_tree_mask, tree_attention, tree_attention_proj

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


@pytest.mark.parametrize("T_proj", [1, 16, 64])
def test_tree_attention_proj(benchmark, bench_against, T_proj):
    """The fused layer's second launch over 512 cached tokens: the attention with the output
    projection, bias and residual (768 x 768 W_o) against eager SDPA + linear + add."""
    prefix, D = 512, H * DH
    S = prefix + T_proj
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape, s=1.0: s * torch.randn(*shape, device="cuda", dtype=torch.float16, generator=gen)  # noqa: E731
    q = rand(B, T_proj, H, DH).transpose(1, 2)
    k_cache, v_cache = rand(B, H, S, DH), rand(B, H, S, DH)
    weight, bias, residual = rand(D, D, s=D**-0.5), rand(D), rand(B, T_proj, D)
    prefix_len = torch.tensor(prefix, device="cuda")
    packed = pack_tree_mask(_tree(T_proj)).cuda()
    dense = dense_tree_mask(prefix_len, packed, S)

    def eager():
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=dense)
        return residual + F.linear(y.transpose(1, 2).reshape(B, T_proj, D), weight, bias)

    bytes_moved = 2 * B * H * S * DH * 2 + weight.numel() * 2 + 2 * residual.numel() * 2
    bench_against(
        benchmark,
        lambda: tree_attention_proj(q, k_cache, v_cache, prefix_len, packed, weight, bias, residual, backend="triton"),
        eager,
        bytes_moved=bytes_moved,
        T=T_proj, H=H, head_dim=DH, prefix=prefix, dtype="float16",
    )
