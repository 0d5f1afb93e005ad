"""Helpers of the fused decoder-layer kernel tests (ln_qkv, linear_residual, ln_fc_gelu)."""

from __future__ import annotations

import os

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
T_VALUES = (1, 2, 5, 17, 64, 128)


def rand(g: torch.Generator, *shape, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=g)).to(DEV, dtype)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` [B, T, D] in a non-contiguous layout: batch and tokens swapped
    in memory, every other feature skipped. The gaps hold NaN, so reading one shows up."""
    B, T, D = t.shape
    buf = torch.full((T, B, 2 * D), float("nan"), dtype=t.dtype, device=t.device)
    view = buf.transpose(0, 1)[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def transposed(w: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] stored as its transpose (K strides 1 apart no more)."""
    return w.T.contiguous().T


def check_close(out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor | None = None, what: str = "") -> None:
    """The kernel's output against the fp32 reference. Without ``eager``: to a small fp32
    tolerance. With ``eager`` (the same computation by eager PyTorch in fp16 / bf16): at most
    twice eager's own error, plus a small atol (FlashAttention's rule)."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    if eager is None:
        assert out.dtype == torch.float32, (what, out.dtype)
        tol = ATOL[torch.float32] * max(1.0, ref.abs().max().item())
    else:
        tol = 2 * (eager.float() - ref.float()).abs().max().item() + ATOL[eager.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0, msg=lambda m: f"{what}: {m}")


def gpu_blocks(monkeypatch, *modules) -> None:
    """Make the launchers of ``modules`` use the GPU's block sizes in the interpreter (16-wide
    column blocks, split K), which otherwise gets blocks as wide as the matrix."""
    from mtpkern.ops import _decode_linear

    real = _decode_linear.blocks

    def blocks(*args, **kwargs):
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            return real(*args, **kwargs)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"

    for module in modules:
        monkeypatch.setattr(module, "blocks", blocks)
