"""How often greedy speculative decoding gives plain decoding's tokens, measured on this device.

On a CPU in fp32 the speculative strategies reproduce plain greedy decoding token for token
(the tests assert it). On a GPU that is not guaranteed: a verification step scores T tree
tokens in one T-row product where plain decoding scores one row, cuBLAS picks different
kernels (and summation orders) for the two, and eager fp32 attention on sm80+ may use
TF32-based kernels, so the logits differ in their last bits and a near-tie can flip an argmax;
from there the outputs go their own ways. This script measures it, per family, dtype and
kernel path, against our plain ``ntp`` eager decoding of the same model and prompt:

- ``identical``: the fraction of prompts whose outputs are identical;
- ``agreement``: the mean fraction of the output before the first differing token;
- ``divergences``: for each output that differs, where, the two tokens, and their gap in an
  fp32 copy of the model at that point (``fp32_gap``, the plain token's logit minus the other's);
  ``tie`` when the gap is within a few rounding steps of the dtype at that logit (the two
  paths rounded a near-tie differently), else it is a real disagreement and a bug;
- ``explained``: every divergence is such a tie.

    python benchmarks/greedy_agreement.py --json agreement.json [--quick] [--prompts 4]

Models: a random GPT-2 124M shape with MTP and MEDUSA heads (``mtpkern.bench.bench_models``;
``--quick``: the tiny config). The JSON file is rewritten after every case.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from mtpkern.bench import bench_models
from mtpkern.generation import generate
from mtpkern.runtime import dtype_name, resolve_device, resolve_dtype


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(plain: list[list[int]], other: list[list[int]]) -> dict:
    """``identical`` and ``agreement`` (see the module docstring) of ``other`` against ``plain``."""
    fractions = [common_prefix(p, o) / max(1, len(p)) for p, o in zip(plain, other)]
    return {"identical": sum(p == o for p, o in zip(plain, other)) / len(plain),
            "agreement": sum(fractions) / len(fractions)}


# Rounding steps of slack: a D-long dot in half precision (fp32 accumulation) differs between
# two kernels by a few units of the inputs' last place, relative to the logit.
TIE_STEPS = 8


def divergence(model32, prompt: torch.Tensor, plain: list[int], other: list[int], dtype: torch.dtype) -> dict | None:
    """The first differing token of ``other`` against ``plain``, judged in an fp32 copy of the model."""
    i = common_prefix(plain, other)
    if i == min(len(plain), len(other)):
        return None if len(plain) == len(other) else {"position": i, "tie": False, "why": "lengths differ"}
    prefix = torch.cat([prompt, torch.tensor(plain[:i], dtype=prompt.dtype, device=prompt.device)])[None]
    z = model32(prefix).logits[0, -1, 0].float()
    a, b = plain[i], other[i]
    gap = float(z[a] - z[b])
    resolution = torch.finfo(dtype).eps * max(abs(float(z[a])), abs(float(z[b])), 1.0)
    return {"position": i, "plain": a, "other": b, "fp32_gap": gap, "tie": abs(gap) <= TIE_STEPS * resolution}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtypes", default=None, help="comma-separated (default float32,float16 on CUDA, float32 on CPU)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="the tiny config instead of the GPT-2 124M shape")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    names = args.dtypes.split(",") if args.dtypes else (["float32", "float16"] if cuda else ["float32"])
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "max_new_tokens": args.max_new_tokens, "prompts": args.prompts, "cases": {}}

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{args.json}.tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(args.json)

    variants = [("eager", dict(kernels="eager"))]
    if cuda:
        variants += [("fused", dict(kernels="fused")), ("fused cuda_graph", dict(kernels="fused", cuda_graph=True))]
    for name in names:
        dtype = resolve_dtype(name)
        models = bench_models(None, quick=args.quick, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        V = models["ntp"].config.vocab_size
        prompts = [torch.randint(0, V, (args.prompt_len,), generator=g).to(device) for _ in range(args.prompts)]
        model32 = copy.deepcopy(models["ntp"]).float()
        with torch.inference_mode():
            plain = [generate(models["ntp"], p, max_new_tokens=args.max_new_tokens, kernels="eager").tokens
                     for p in prompts]
            for family in ("mtp", "medusa"):
                for label, kw in variants:
                    case = f"{dtype_name(dtype)} {family} {label}"
                    try:
                        out = [generate(models[family], p, max_new_tokens=args.max_new_tokens, strategy=family,
                                        **kw).tokens for p in prompts]
                        report["cases"][case] = agreement(plain, out)
                        found = [dict(prompt=k, **d) for k, (p, o, x) in enumerate(zip(prompts, plain, out))
                                 if (d := divergence(model32, p, o, x, dtype)) is not None]
                        report["cases"][case].update(divergences=found, explained=all(d["tie"] for d in found))
                    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                        report["cases"][case] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    print(f"{case}: {report['cases'][case]}", flush=True)
                    save()
        del models, model32
    save()
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
