"""Fused linear cross-entropy: the unembedding and the loss in row chunks, so the ``[N, V]``
logits and their gradient never exist at once.

For rows ``h_n`` of ``hidden`` [N, D], the unembedding ``W`` [V, D] (bias ``b`` [V] optional)
and labels ``y_n`` (``ignore_index`` marks rows without a target):

    z_n = W h_n + b,    lse_n = log sum_v exp(z_nv),    loss_n = lse_n - z_n[y_n]
    dloss_n / dz_n = softmax(z_n) - onehot(y_n)

``reduction`` "sum" adds the loss_n of the valid rows, "mean" divides that by their number
(NaN when there is none, like ``F.cross_entropy``), "none" returns loss_n (0 on ignored rows).
With ``g_n`` the gradient reaching loss_n (``dL/dloss`` for "sum", that over the number of valid
rows for "mean", the incoming row gradient for "none"; 0 on ignored rows) and
``G = diag(g) dloss/dz`` [N, V]:

    dL/dhidden = G W,    dL/dW = G^T hidden,    dL/db = sum_n G_n

Rows are taken C at a time (C * V fp32 logits; see the chunk sizes below): the chunk's
logits are computed (a matmul, fp32 out), one kernel turns them into loss_n and, in place,
into the chunk of G (online log-sum-exp over V blocks, then a second pass writing the
gradient), and two matmuls add the chunk's share of dL/dhidden and dL/dW (accumulated in fp32
over chunks). For "mean" and "sum" the loss is a scalar, so ``g`` is known up to one factor in
the forward pass: the gradients are computed there (Liger-Kernel's trick, no second matmul over
the vocabulary) and the backward only scales them. For "none" the forward computes the losses
only and the backward recomputes the chunks with the incoming row gradients.

The kernel also counts, per row, the logits strictly larger than the target's (the target's
rank): the target is in the top-k when that count is below k (ties count in its favour, where
``torch.topk`` may order them either way).
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mtpkern.ops import _backend
from mtpkern.ops._triton_compat import wrap_triton

REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: the reference only
# fp32 logits per chunk on a GPU (and in the interpreter): 256 MiB, 1024 rows at GPT-2's
# vocabulary. Each chunk costs a fixed set of launches and one read-modify-write of the [V, D]
# fp32 dL/dW, whatever its rows: with 16 MiB chunks (64 rows) an H200 took 30 ms for 4096 rows
# (fp16, forward + backward), 41 ms of it host time, against eager's 10.4 ms; 16x fewer chunks
# cut both. The peak stays far below eager's (about 0.6 GB against 2.4 GB for those rows).
_CHUNK_ELEMENTS = 2**26
# On the CPU each chunk's dL/dW update rereads and rewrites the whole [V, D] gradient, memory
# traffic a CPU feels: 32 MiB chunks (128 rows at GPT-2's vocabulary) make a GPT-2 124M
# training step about as fast as the plain loss's (1.0-1.06x against 1.13x with 16 MiB chunks,
# 1 thread), for 16 MiB more at the peak.
_CPU_CHUNK_ELEMENTS = 2**23
_REF_BLOCK_V = 4096


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _cross_entropy_rows_kernel(
    z_ptr,  # [C, V] fp32 logits of a chunk; overwritten by g_n * (softmax - onehot) if WRITE_GRAD
    labels_ptr, row_grad_ptr,  # [C] int64, [C] fp32 (g_n, 0 on ignored rows; unused without WRITE_GRAD)
    loss_ptr, rank_ptr,  # outputs: [C] fp32, [C] int64
    V, stride_z, ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride_z can pass 2**31
    z_row = z_ptr + row * stride_z
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)
    z_target = tl.load(z_row + target)
    cols = tl.arange(0, BLOCK_V)

    # Online log-sum-exp: m is the running maximum, s = sum exp(z - m) so far. Every block
    # holds at least one column, so m is finite after the first block.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    above = tl.full((), 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + cols < V
        z = tl.load(z_row + v0 + cols, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        above += tl.sum((z > z_target).to(tl.int32), axis=0)
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
    tl.store(rank_ptr + row, tl.where(valid, above, -1).to(tl.int64))

    if WRITE_GRAD:
        g = tl.load(row_grad_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + cols < V
            z = tl.load(z_row + v0 + cols, mask=ok, other=0.0)
            dz = tl.exp(z - lse) - tl.where(v0 + cols == label, 1.0, 0.0)
            tl.store(z_row + v0 + cols, dz * g, mask=ok)


# ----------------------------------------------------------------------------- reference


def _cross_entropy_rows_ref(z: Tensor, labels: Tensor, row_grad: Optional[Tensor], ignore_index: int):
    """The kernel's maths in PyTorch, on one chunk of fp32 logits ``z`` [C, V]:
    (loss_n, rank_n), and ``z`` overwritten by ``g_n * (softmax(z_n) - onehot(y_n))`` when
    ``row_grad`` is given. In place: no second [C, V] float buffer."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)[:, None]
    z_target = z.gather(1, target)
    # counted over column blocks, like the kernel: a comparison over all of z at once would
    # allocate [C, V] bools and, to sum them, [C, V] int64s
    above = sum((z[:, v0 : v0 + _REF_BLOCK_V] > z_target).sum(1) for v0 in range(0, z.shape[1], _REF_BLOCK_V))
    rank = torch.where(valid, above, -1)
    m = z.amax(1, keepdim=True)
    e = z.sub_(m).exp_()  # z is exp(z - m) from here on
    s = e.sum(1, keepdim=True)
    loss = torch.where(valid, (m + s.log() - z_target)[:, 0], 0.0)
    if row_grad is not None:
        e.div_(s)
        e.scatter_add_(1, target, -valid[:, None].to(e.dtype))
        e.mul_(row_grad[:, None])
    return loss, rank


def _chunk_rows(N: int, V: int, cpu: bool = False) -> int:
    elements = _CPU_CHUNK_ELEMENTS if cpu else _CHUNK_ELEMENTS
    return max(16, min(max(N, 1), triton.next_power_of_2(elements // V + 1) // 2))


def linear_cross_entropy_ref(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    row_grad: Optional[Tensor] = None, needs: tuple[bool, bool, bool] = (True, True, True),
    grad_scale: Optional[Tensor] = None, *, kernel: bool = False, grad_w_into: Optional[Tensor] = None,
):
    """Reference (and the CPU implementation): the chunked pass described in the module docstring.

    Returns ``(loss_n [N], rank_n [N] int64, dL/dhidden, dL/dW, dL/db)``, all float fp32 (float64
    for float64 inputs). The gradients are those of ``grad_scale * sum_n row_grad[n] * loss_n``,
    computed only when ``row_grad`` (0 on ignored rows) is given, each where ``needs`` asks for
    it (else None); ``grad_scale`` (a scalar tensor, default 1) multiplies the fp32 sums at the
    end, so half-precision chunks of the gradient do not underflow by a factor 1 / N.
    In fp32 throughout: the weight is read in fp32 (a copy for half inputs), so at most C * V
    logits and one chunk of their gradient exist at a time. ``kernel=True`` is the launcher:
    the Triton kernel does each chunk's cross-entropy, and the matmuls run in the inputs' dtype
    with fp32 logits and fp32 accumulation over chunks. ``grad_w_into``: a [V, D] fp32 tensor the
    chunks' dL/dW are added into (then ``grad_scale`` must be None: fold it into ``row_grad``).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    labels = labels.long()
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # float64 for gradcheck
    half = hidden.dtype not in (torch.float32, torch.float64)
    w = weight if kernel else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    grads = row_grad is not None
    grad_h = torch.empty(N, D, dtype=acc, device=dev) if grads and needs[0] else None
    grad_w = torch.zeros(V, D, dtype=acc, device=dev) if grads and needs[1] else None
    if grad_w_into is not None:
        grad_w = grad_w_into
    grad_b = torch.zeros(V, dtype=acc, device=dev) if grads and needs[2] and bias is not None else None
    loss = torch.empty(N, dtype=acc, device=dev)
    rank = torch.empty(N, dtype=torch.int64, device=dev)
    C = _chunk_rows(N, V, cpu=dev.type == "cpu" and not kernel)
    for c0 in range(0, N, C):
        rows = slice(c0, min(N, c0 + C))
        h = hidden[rows] if kernel else hidden[rows].to(acc)
        z = (h @ w.T).to(acc)  # no copy in fp32; cuBLAS accumulates half matmuls in fp32
        if b is not None:
            z += b
        g = row_grad[rows].to(acc) if row_grad is not None else None
        if kernel:
            _launch(z, labels[rows], g, ignore_index, loss[rows], rank[rows])
        else:
            loss[rows], rank[rows] = _cross_entropy_rows_ref(z, labels[rows], g, ignore_index)
        if not grads:
            continue
        dz = z.to(hidden.dtype) if kernel and half else z  # tensor cores take both sides in half
        if grad_h is not None:
            grad_h[rows] = dz @ w
        if grad_w is not None:
            if kernel and half:
                grad_w += dz.T @ h  # fp32 accumulation over chunks, no fp32 temporary
            else:
                grad_w.addmm_(dz.T, h)
        if grad_b is not None:
            grad_b += z.sum(0)
    if grad_scale is not None:
        for t in (grad_h, grad_b) if grad_w_into is not None else (grad_h, grad_w, grad_b):
            if t is not None:
                t *= grad_scale
    return loss, rank, grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------- launcher


def _check_inputs(hidden, weight, labels, bias, ignore_index, reduction) -> None:
    """One-line errors for bad arguments; the label values are checked on real tensors only."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    (N, D), (V, Dw) = hidden.shape, weight.shape
    if D != Dw:
        raise ValueError(f"hidden [N, D] and weight [V, D] disagree on D: {D} vs {Dw}")
    if V == 0 or D == 0:
        raise ValueError(f"empty weight {tuple(weight.shape)}: V and D must be >= 1")
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"hidden.dtype must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight.dtype ({weight.dtype}) must equal hidden.dtype ({hidden.dtype})")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels.dtype must be int32 or int64, got {labels.dtype}")
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape [N] = [{N}], got {tuple(labels.shape)}")
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape [V] = [{V}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias.dtype ({bias.dtype}) must equal hidden.dtype ({hidden.dtype})")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if 0 <= ignore_index < V:
        raise ValueError(f"ignore_index={ignore_index} is a class of the vocabulary [0, {V}): use a negative value")
    if N and not is_fake(labels) and labels.device.type != "meta":
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):  # one host sync: an out-of-range label would read past the logits
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}, "
                             f"got {labels[bad][0].item()}")


def _config(V: int) -> dict:
    # The interpreter pays per block step, not per element: wider blocks keep the tests fast.
    block_v = min(8192 if _backend.triton_interpret() else 4096, triton.next_power_of_2(V))
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


def _launch(z: Tensor, labels: Tensor, row_grad: Optional[Tensor], ignore_index: int, loss: Tensor, rank: Tensor):
    """One chunk: loss and rank of each row of ``z``, and ``z`` turned into its gradient."""
    C, V = z.shape
    cfg = _config(V)
    with torch.cuda.device(z.device) if z.device.type == "cuda" else contextlib.nullcontext():
        wrap_triton(_cross_entropy_rows_kernel)[(C,)](
            z, labels, row_grad if row_grad is not None else loss, loss, rank,
            V, z.stride(0), ignore_index,
            WRITE_GRAD=row_grad is not None, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
        )


# Under Triton's interpreter (TRITON_INTERPRET=1, the test suite) the automatic choice keeps CPU
# tensors on the chunked reference: every training test would otherwise interpret this kernel for
# every head of every step. The op's own tests set this, and MTPKERN_BACKEND=triton forces it.
INTERPRET_ON_CPU = False


def _run(hidden, weight, labels, bias, ignore_index, row_grad, needs, grad_scale=None, grad_w_into=None):
    use_kernel = (_backend.pick(hidden.device, ("triton", "eager")) == "triton" and hidden.dtype != torch.float64
                  and (hidden.device.type != "cpu" or INTERPRET_ON_CPU or _backend.forced_backend() == "triton"))
    return linear_cross_entropy_ref(hidden, weight, labels, bias, ignore_index, row_grad, needs, grad_scale,
                                    kernel=use_kernel, grad_w_into=grad_w_into)


# ----------------------------------------------------------------------------- registration


@torch.library.custom_op("mtpkern::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int, reduction: str,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, rank [N], dloss/dhidden, dloss/dweight, dloss/dbias). For "mean" and "sum" the
    gradients asked for by the three flags are computed here, in fp32 (float64 for float64
    inputs; empty tensors where not asked for); for "none" they are always empty (the backward
    op recomputes them)."""
    _check_inputs(hidden, weight, labels, bias, ignore_index, reduction)
    want = reduction != "none" and (grad_hidden or grad_weight or (grad_bias and bias is not None))
    valid = labels != ignore_index
    count = valid.sum()
    scale = 1.0 / count.clamp(min=1).double() if reduction == "mean" else None
    loss, rank, gh, gw, gb = _run(hidden, weight, labels, bias, ignore_index, valid.float() if want else None,
                                  (grad_hidden, grad_weight, grad_bias), scale)
    if reduction != "none":
        loss = loss.sum() / count if reduction == "mean" else loss.sum()
    empty = lambda t: t if t is not None else loss.new_empty(0)  # noqa: E731
    return loss, rank, empty(gh), empty(gw), empty(gb)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, reduction, grad_hidden, grad_weight, grad_bias):
    _check_inputs(hidden, weight, labels, bias, ignore_index, reduction)
    N = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=acc)
    grads = reduction != "none"
    gh = hidden.new_empty(hidden.shape if grads and grad_hidden else (0,), dtype=acc)
    gw = hidden.new_empty(weight.shape if grads and grad_weight else (0,), dtype=acc)
    gb = hidden.new_empty(bias.shape if grads and grad_bias and bias is not None else (0,), dtype=acc)
    return loss, labels.new_empty(N, dtype=torch.int64), gh, gw, gb


@torch.library.custom_op("mtpkern::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int, grad_rows: Tensor,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of sum_n grad_rows[n] * loss_n (reduction "none"), recomputed chunk by chunk."""
    _check_inputs(hidden, weight, labels, bias, ignore_index, "none")
    if grad_rows.shape != labels.shape:
        raise ValueError(f"grad_rows must have shape [N] = [{labels.shape[0]}], got {tuple(grad_rows.shape)}")
    row_grad = grad_rows * (labels != ignore_index)
    _, _, gh, gw, gb = _run(hidden, weight, labels, bias, ignore_index, row_grad, (grad_hidden, grad_weight, grad_bias))
    cast = lambda t, ref: t.to(ref.dtype) if t is not None else hidden.new_empty(0)  # noqa: E731
    return cast(gh, hidden), cast(gw, weight), cast(gb, hidden)


@_linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, grad_rows, grad_hidden, grad_weight, grad_bias):
    _check_inputs(hidden, weight, labels, bias, ignore_index, "none")
    gh = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    gw = weight.new_empty(weight.shape if grad_weight else (0,))
    gb = hidden.new_empty(bias.shape if grad_bias and bias is not None else (0,))
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, reduction, *_ = inputs
    _, rank, gh, gw, gb = output
    ctx.mark_non_differentiable(rank, gh, gw, gb)
    ctx.set_materialize_grads(False)  # no [V, D] of zeros as the "gradient" of dloss/dweight
    ctx.reduction, ctx.ignore_index, ctx.dtypes = reduction, ignore_index, (hidden.dtype, weight.dtype, hidden.dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, labels, bias)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _graph_kept() -> bool:
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)  # private: be careful
    return True if keep is None else bool(keep())


def _backward(ctx, grad_loss, *_):
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if grad_loss is None:  # grads are not materialised: none reached the loss
        return (None,) * 9
    if ctx.reduction == "none":
        hidden, weight, labels, bias = ctx.saved_tensors
        gh, gw, gb = torch.ops.mtpkern.linear_cross_entropy_backward(
            hidden, weight, labels, bias, ctx.ignore_index, grad_loss, need_h, need_w, need_b)
    else:
        # The forward computed the gradients for dL/dloss = 1; scale them by the real one: in
        # place when this graph is freed after this backward (eager, retain_graph=False), so
        # dL/dW needs no second [V, D] buffer; else (a retained or traced graph) a copy.
        saved = ctx.saved_tensors
        if all(type(t) is Tensor for t in (*saved, grad_loss)) and not _graph_kept():
            gh, gw, gb = (t.mul_(grad_loss.to(t.dtype)) for t in saved)
        else:
            gh, gw, gb = (t * grad_loss.to(t.dtype) for t in saved)
        # in the inputs' dtypes only now, after the scaling: a loss-scaled fp16 gradient
        # does not underflow (a no-op in fp32)
        gh, gw, gb = (t.to(dtype) for t, dtype in zip((gh, gw, gb), ctx.dtypes))
    pick = lambda need, t: t if need and t.numel() else None  # noqa: E731
    return pick(need_h, gh), pick(need_w, gw), None, pick(need_b, gb), None, None, None, None, None


torch.library.register_autograd("mtpkern::linear_cross_entropy", _backward, setup_context=_setup_context)


@torch.library.custom_op("mtpkern::linear_cross_entropy_accumulate_", mutates_args=("grad_weight",))
def _linear_cross_entropy_accumulate_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, grad_scale: Tensor, grad_weight: Tensor,
) -> tuple[Tensor, Tensor]:
    """(sum of the valid rows' losses, dL/dhidden) for L = grad_scale * that sum, with dL/dweight
    added into ``grad_weight`` in place (no autograd: the caller drives the backward)."""
    _check_inputs(hidden, weight, labels, None, ignore_index, "sum")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if grad_weight.shape != weight.shape or grad_weight.dtype != acc or grad_weight.device != hidden.device:
        raise ValueError(f"grad_weight must be {str(acc).removeprefix('torch.')} {tuple(weight.shape)} on "
                         f"{hidden.device}, got {str(grad_weight.dtype).removeprefix('torch.')} "
                         f"{tuple(grad_weight.shape)} on {grad_weight.device}")
    if grad_scale.dim() != 0:
        raise ValueError(f"grad_scale must be a 0-d tensor, got shape {tuple(grad_scale.shape)}")
    if not grad_weight.is_contiguous():
        raise ValueError("grad_weight must be contiguous")
    row_grad = (labels != ignore_index).to(acc) * grad_scale.to(device=hidden.device, dtype=acc)
    loss, _, gh, _, _ = _run(hidden, weight, labels, None, ignore_index, row_grad, (True, True, False),
                             grad_w_into=grad_weight)
    return loss.sum(), gh.to(hidden.dtype)


@_linear_cross_entropy_accumulate_op.register_fake
def _(hidden, weight, labels, ignore_index, grad_scale, grad_weight):
    _check_inputs(hidden, weight, labels, None, ignore_index, "sum")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return hidden.new_empty((), dtype=acc), hidden.new_empty(hidden.shape)


# ----------------------------------------------------------------------------- public


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: Optional[Tensor] = None,
    return_hits: bool = False,
):
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=..., reduction=...)``
    without the [N, V] logits: hidden [N, D], weight [V, D], bias [V] or None (one float dtype,
    one device), labels [N] int32/int64. The loss is fp32; its gradients reach hidden, weight
    and bias in their dtypes. Under ``torch.autocast`` hidden, weight and bias are cast to the
    autocast dtype first, as for a matmul.

    With ``return_hits``: ``(loss, hits)``, hits = int64 [2], how many non-ignored rows have
    their label in the top-1 and in the top-5 logits.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    grad = torch.is_grad_enabled()
    flags = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, rank, *_ = torch.ops.mtpkern.linear_cross_entropy(hidden, weight, labels, bias, int(ignore_index),
                                                          reduction, *flags)
    if not return_hits:
        return loss
    valid = rank >= 0
    hits = torch.stack([(valid & (rank < 1)).sum(), (valid & (rank < 5)).sum()])
    return loss, hits


def linear_cross_entropy_accumulate_(hidden: Tensor, weight: Tensor, labels: Tensor, grad_weight: Tensor,
                                     grad_scale, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """One head's share of a backward whose heads share an unembedding (MTP in Gloeckle et al.'s
    memory-efficient order): returns ``(sum of the valid rows' CE, dL/dhidden)`` for
    ``L = grad_scale * sum_n CE_n`` and adds dL/dweight into ``grad_weight`` (fp32 [V, D], e.g.
    the weight's ``.grad``) chunk by chunk. Through autograd every head's forward would hold a
    [V, D] gradient of its own next to the accumulated ``.grad`` until its backward; here none
    exists. Nothing is recorded for autograd: backpropagate dL/dhidden yourself
    (``hidden_before_detach.backward(grad)``). ``grad_scale``: a number or a 0-d tensor (no host
    sync). Under ``torch.autocast`` hidden and weight are cast to the autocast dtype first.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if not torch.is_tensor(grad_scale):
        grad_scale = torch.tensor(float(grad_scale), dtype=torch.float64)
    return torch.ops.mtpkern.linear_cross_entropy_accumulate_(hidden.detach(), weight.detach(), labels,
                                                             int(ignore_index), grad_scale.detach(), grad_weight)


__all__ = ["linear_cross_entropy", "linear_cross_entropy_accumulate_", "linear_cross_entropy_ref", "REDUCTIONS"]
