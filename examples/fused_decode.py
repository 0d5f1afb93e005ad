"""Decode with the fused kernels from your own script, beside the eager path.

    python examples/fused_decode.py CHECKPOINT_DIR [--prompt TEXT] [--dtype fp16]

On a GPU, ``kernels="auto"`` runs the fused Triton / CUDA ops (multi-head logits, tree
attention, verification, KV compaction) and ``cuda_graph=True`` replays the fixed-shape steps;
on a CPU both paths run the eager references, and greedy outputs are token-identical. On a GPU
they usually are too, but not always: the fused kernels and cuBLAS sum in different orders, and
eager fp32 attention may use TF32 on sm80+, so a near-tie between two tokens can round the other
way and the outputs part from there (benchmarks/greedy_agreement.py measures how often).
"""

import argparse

import torch

from mtpkern import Decoder, load_model
from mtpkern.data import format_prompt, load_tokenizer
from mtpkern.runtime import resolve_device, resolve_dtype


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a run directory or its checkpoint/ folder")
    p.add_argument("--prompt", default="Tom has 12 apples and buys 7 more. How many apples does he have?")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    args = p.parse_args(argv)

    device = resolve_device("auto")
    model = load_model(args.checkpoint, device=device, dtype=resolve_dtype(args.dtype))
    tokenizer = load_tokenizer(args.checkpoint)
    ids = torch.tensor(tokenizer(format_prompt(args.prompt))["input_ids"], device=device)
    strategy = {"gpt2": "ntp"}.get(model.config.model_type, model.config.model_type)

    runs = {}
    for kernels in ("eager", "auto"):
        # One decoder per setting, kept: it holds the cache and the captured CUDA graphs.
        decoder = Decoder(model, strategy, kernels=kernels, cuda_graph=kernels == "auto" and device.type == "cuda")
        for _ in range(2):  # the first call warms up (Triton compiles, graph captures, caches allocate)
            runs[kernels] = decoder.generate(ids, max_new_tokens=args.max_new_tokens,
                                             eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(runs["auto"].tokens, skip_special_tokens=True))
    for kernels, r in runs.items():
        print(f"{kernels:>5}: {r.tokens_per_second:8.1f} tok/s, mean accepted length {r.mean_accept_length:.2f} ({device})")
    a, b = runs["auto"].tokens, runs["eager"].tokens
    if a == b:
        print("fused and eager outputs are token-identical")
    else:  # rounding (see the module docstring); say how far they agreed
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"fused and eager outputs agree on the first {same} of {len(b)} tokens, then differ (rounding on {device})")


if __name__ == "__main__":
    main()
