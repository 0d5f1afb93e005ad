"""One screen at the end of ``gpu_check.sh``: each stage's outcome, then the headline figures
read from the JSON the benchmarks wrote (whatever of it exists: a stage that timed out keeps
the cases it finished).

    python benchmarks/gpu_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# ANCHORS.md's H100 targets, by benchmark file and case name.
TARGET_US = {("bench_fused_logits.py", "test_fused_logits[6]"): 35,
             ("bench_tree_attention.py", "test_tree_attention[512]"): 15,
             ("bench_verify.py", "test_verify_greedy"): 10,
             ("bench_kv_compact.py", "test_kv_compact_gpt2"): 10}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"[:120]} if path.exists() else None


def stages(out: Path) -> list[str]:
    lines = ["stage          result   seconds  note"]
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines() if line]
    for name, status, secs, note in rows:
        lines.append(f"{name:<14} {status:<8} {secs:>7}  {note}"[:110])
    failed = [r[0] for r in rows if r[1] == "FAILED"]
    lines.append(f"{sum(r[1] == 'passed' for r in rows)} passed, {len(failed)} failed"
                 + (f" ({', '.join(failed)})" if failed else "")
                 + f", {sum(r[1] == 'skipped' for r in rows)} skipped")
    return lines


def kernels(report) -> list[str]:
    lines = ["kernel benchmarks (device us, L2 flushed): kernel vs eager, speedup, GB/s, host us, target"]
    for c in report.get("cases", []):
        target = TARGET_US.get((c.get("file"), c.get("name")))
        mark = "" if target is None else f"  target <= {target} us: " + ("met" if c["kernel_device_us"] <= target else "MISSED")
        lines.append(f"  {c['file'].removeprefix('bench_').removesuffix('.py')} {c['name'].removeprefix('test_')}: "
                     f"{c['kernel_device_us']} vs {c['eager_device_us']} us, {c['speedup_vs_eager']}x, "
                     f"{c['gbps']} GB/s, host {c['kernel_host_us']} vs {c['eager_host_us']}{mark}")
    return lines


def decode(title: str, report) -> list[str]:
    lines = [f"{title} (tokens/s)"]
    for name, c in report.get("cases", {}).items():
        if "tokens_per_second" in c:
            extra = f", accepted {c['mean_accept_length']:.2f}" if c.get("mean_accept_length") else ""
            lines.append(f"  {name}: {c['tokens_per_second']:.1f}{extra}")
        elif "error" in c:
            lines.append(f"  {name}: failed: {c['error'][:70]}")
    return lines


def agreement(report) -> list[str]:
    lines = ["greedy agreement with plain decoding (identical outputs, agreeing fraction; divergences)"]
    for name, c in report.get("cases", {}).items():
        if "agreement" not in c:
            lines.append(f"  {name}: failed: {c.get('error', '?')[:70]}")
            continue
        line = f"  {name}: {c['identical']:.2f}, {c['agreement']:.3f}"
        found = c.get("divergences") or []
        if found:
            gaps = [abs(d["fp32_gap"]) for d in found if "fp32_gap" in d]
            line += (f"; {len(found)} at near-ties" if c.get("explained") else f"; {len(found)}, NOT ALL NEAR-TIES: A BUG")
            line += f" (largest fp32 gap {max(gaps):.2g})" if gaps else ""
        lines.append(line)
    return lines


def memory(report) -> list[str]:
    lines = ["training step memory (peak MiB, vs ntp-fused, step s)"]
    for r in report.get("results", []):
        vs = r.get("vs_ntp_fused")
        lines.append(f"  {r['variant']}: {r['peak_bytes'] / 2**20:.0f} MiB"
                     + (f", {vs:.2f}x" if vs else "") + (f", {r['step_s']:.3f} s" if r.get("step_s") else ""))
    return lines


def batch(report) -> list[str]:
    lines = ["batched decoding (tokens/s at B = ..., and over its ntp)"]
    for family, strategies in report.get("batch", {}).items():
        for strategy, by_b in strategies.items():
            base = "ntp+graph" if strategy.endswith("+graph") else "ntp"  # graphed cases over graphed ntp
            ntp = strategies.get(base, {})
            cells = [f"B={b} {v['tokens_per_second']:.0f}"
                     + (f" ({v['tokens_per_second'] / ntp[b]['tokens_per_second']:.2f}x)" if strategy != base and b in ntp
                        else "") for b, v in by_b.items()]
            lines.append(f"  {family}: {strategy}: " + ", ".join(cells))
    return lines


def main(out: str) -> None:
    out = Path(out)
    lines = stages(out)
    for file, show in (("bench_kernels.json", kernels), ("agreement.json", agreement),
                       ("bench_decode.json", lambda r: decode("bench_decode", r)),
                       ("bench_batch.json", batch),
                       ("bench_e2e.json", lambda r: decode("mtpkern bench", r)),
                       ("bench_mtp_memory.json", memory)):
        report = _load(out / file)
        if report is None:
            continue
        try:
            lines += show(report) if "error" not in report else [f"{file}: unreadable ({report['error']})"]
        except (KeyError, TypeError, AttributeError) as e:  # a format this summary does not know
            lines.append(f"{file}: cannot summarise ({type(e).__name__}: {e})")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_results")
