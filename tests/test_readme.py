"""Every command in the README's code blocks runs as written, so the README cannot drift.

The README is parsed when the test runs: a command added to it is run too, and a command of a
shape this file does not know fails the test (teach ``plan`` below how to run it) rather than
being skipped. Only sizes are substituted where the README trains or decodes for real
(``--steps``, ``--epochs``, ``--config``, token counts, sample counts), local data where it
names a hub dataset or model (``metamathqa``, ``gpt2``: a tiny GPT-2 written with
``save_pretrained``), a random tiny checkpoint of the same kind where it loads a run of the demo
(``demo_out/medusa``: the demo itself runs in ``tests/test_cli.py``), and, on a machine without
a GPU, the CPU where it names CUDA. Each substitution is listed in the failure message beside the
command that ran.
"""

from __future__ import annotations

import functools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from _tiny import save_random_medusa

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL = ("bash", "sh", "shell", "console")
INERT = ("text", "json", "yaml", "toml", "markdown", "md", "diff", "output")
# Run by CI itself (the README's first two commands), or by a test of their own.
COVERED = {
    "pip install": "CI installs the package",
    "python -m pytest": "CI runs the test suite",
    "mtpkern demo": "tests/test_cli.py::test_demo_end_to_end_quick runs `mtpkern demo --quick`",
}
TINY = {"steps": "2", "data_limit": "48", "max_new_tokens": "8", "max_samples": "2", "prompts": "1"}
HUB_DATASETS = ("metamathqa",)
# The demo's runs (``demo_out/NAME``, written by the set-up command) that the README may load, and
# what stands in for each: a random tiny checkpoint of the same kind, with room for the prompts.
DEMO_RUNS = {"medusa": functools.partial(save_random_medusa, n_positions=512)}


@dataclass
class Step:
    """One thing to run: ``kind`` is "cli" (``mtpkern`` argv), "script" (``python FILE`` argv),
    "torchrun" (argv after ``torchrun``), "python" (a script's source) or "skip" (with a reason)."""

    source: str
    kind: str
    argv: list[str] = field(default_factory=list)
    code: str = ""
    changes: list[str] = field(default_factory=list)
    demo_runs: list[str] = field(default_factory=list)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``[(language, body)]`` of the fenced blocks of a markdown text."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in
            re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)]


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``a && b`` split."""
    joined = re.sub(r"\\\n", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        out += [part.strip() for part in line.split("&&")]
    return out


def _set(argv: list[str], flag: str, value: str, changes: list[str], *, only_if_present=False) -> None:
    if flag in argv:
        i = argv.index(flag) + 1
        if argv[i] != value:
            changes.append(f"{flag} {argv[i]} -> {value}")
            argv[i] = value
    elif not only_if_present:
        changes.append(f"+ {flag} {value}")
        argv += [flag, value]


def tiny_cli(argv: list[str], changes: list[str]) -> list[str]:
    """``mtpkern`` arguments with tiny sizes, local data and models, and the CPU without CUDA."""
    argv = list(argv)
    command = argv[0]
    if command == "train":
        if "--epochs" not in argv:
            _set(argv, "--steps", TINY["steps"], changes)
        _set(argv, "--data-limit", TINY["data_limit"], changes)
        _set(argv, "--config", "tiny", changes, only_if_present=True)
        if "--data" in argv and argv[argv.index("--data") + 1] in HUB_DATASETS:
            _set(argv, "--data", "data.jsonl", changes)
    elif command == "eval":
        _set(argv, "--max-samples", TINY["max_samples"], changes)
        _set(argv, "--max-new-tokens", TINY["max_new_tokens"], changes)
    elif command == "generate":
        _set(argv, "--max-new-tokens", TINY["max_new_tokens"], changes)
    elif command == "distill":
        _set(argv, "--data-limit", TINY["data_limit"], changes)
        _set(argv, "--max-new-tokens", TINY["max_new_tokens"], changes)
    elif command == "bench":
        if "--quick" not in argv:
            changes.append("+ --quick")
            argv.append("--quick")
        _set(argv, "--prompts", TINY["prompts"], changes)
        _set(argv, "--max-new-tokens", TINY["max_new_tokens"], changes)
    if not torch.cuda.is_available() and "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda"):
        _set(argv, "--device", "cpu", changes)
    if "--cuda-graph" in argv and not torch.cuda.is_available():
        changes.append("- --cuda-graph")
        argv.remove("--cuda-graph")
    return argv


def tiny_python(code: str, changes: list[str]) -> str:
    """The README's Python with tiny token counts, and the CPU (fp32, no CUDA graphs) without CUDA."""
    subs = [(r"max_new_tokens=\d+", f"max_new_tokens={TINY['max_new_tokens']}")]
    if not torch.cuda.is_available():
        subs += [(r'device="cuda(:\d+)?"', 'device="cpu"'), (r"dtype=torch\.(float16|bfloat16)", "dtype=torch.float32"),
                 (r"cuda_graph=True", "cuda_graph=False")]
    for pattern, repl in subs:
        code, n = re.subn(pattern, repl, code)
        if n:
            changes.append(f"{pattern} -> {repl}")
    return code


def demo_runs(text: str) -> list[str]:
    """The demo's runs that ``text`` loads (``demo_out/NAME``); one with no stand-in raises ValueError."""
    names = sorted(set(re.findall(r"demo_out/([\w.-]+)", text)))
    unknown = [n for n in names if n not in DEMO_RUNS]
    if unknown:
        raise ValueError(f"the README loads demo_out/{unknown[0]}: teach tests/test_readme.py (DEMO_RUNS) "
                         "what stands in for that run of the demo")
    return names


def plan(readme: str) -> list[Step]:
    """What to run for every command of the README, in order; an unknown shape raises ValueError."""
    steps = []
    for lang, body in code_blocks(readme):
        if lang == "python":
            changes = []
            steps.append(Step(body, "python", code=tiny_python(body, changes), changes=changes,
                              demo_runs=demo_runs(body)))
            continue
        if lang in INERT:
            continue
        if lang not in SHELL:
            raise ValueError(f"a README code block in language {lang!r}: label it bash, python or text, "
                             "or teach tests/test_readme.py to run it")
        for command in shell_commands(body):
            covered = [why for prefix, why in COVERED.items() if command.startswith(prefix)]
            if covered:
                steps.append(Step(command, "skip", code=covered[0]))
                continue
            argv = shlex.split(command)
            changes = []
            if argv[0] == "mtpkern" and len(argv) > 1:
                steps.append(Step(command, "cli", tiny_cli(argv[1:], changes), changes=changes))
            elif argv[:3] == ["python", "-m", "mtpkern.cli"] and len(argv) > 3:
                steps.append(Step(command, "cli", tiny_cli(argv[3:], changes), changes=changes))
            elif argv[0] == "torchrun" and "mtpkern.cli" in argv:
                i = argv.index("mtpkern.cli") + 1
                steps.append(Step(command, "torchrun", argv[1:i] + tiny_cli(argv[i:], changes), changes=changes))
            elif argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
                steps.append(Step(command, "script", argv[1:], changes=changes))
            else:
                raise ValueError(f"tests/test_readme.py does not know how to run the README command {command!r}: "
                                 "teach plan() its shape")
            steps[-1].demo_runs = demo_runs(command)
    return steps


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A user's folder: a local copy of the hub dataset and a tiny hub-style GPT-2 with its tokenizer."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from mtpkern.data import synthetic_records, train_tokenizer

    records = synthetic_records(64, seed=3)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = train_tokenizer(records, vocab_size=300)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HFConfig(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    tok.save_pretrained(tmp_path / "tiny-gpt2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MTPKERN_DEBUG", raising=False)
    return tmp_path


def _local_inputs(step: Step, workdir: Path) -> None:
    """Just before a step runs: a local data file the README names (``my_data.jsonl``) is the
    user's, so write one; a ``--base`` that is not a local path (an earlier command's run
    directory) is a hub name: the tiny GPT-2 stands in for it; a run of the demo it loads is
    written by its stand-in."""
    for name in step.demo_runs:
        path = workdir / "demo_out" / name
        if not path.exists():
            DEMO_RUNS[name](path)
            step.changes.append(f"demo_out/{name}: a random tiny checkpoint stands in for the demo's run")
    argv = step.argv
    if "--data" in argv:
        path = workdir / argv[argv.index("--data") + 1]
        if path.suffix in (".json", ".jsonl") and not path.exists():
            path.write_text((workdir / "data.jsonl").read_text())
    if "--base" in argv and not (workdir / argv[argv.index("--base") + 1]).exists():
        _set(argv, "--base", "tiny-gpt2", step.changes)


def run_step(step: Step, workdir: Path, capsys) -> tuple[int, str]:
    """Run one step; ``(exit status, output)``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    _local_inputs(step, workdir)
    if step.kind == "cli":
        from mtpkern.cli import main

        try:
            code = main(step.argv)
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out + out.err
    if step.kind == "python":
        script = workdir / "readme_block.py"
        script.write_text(step.code)
        runpy.run_path(str(script), run_name="__main__")
        out = capsys.readouterr()
        return 0, out.out + out.err
    if step.kind == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *step.argv]
    else:  # a script of the repository, run from its root as the README shows
        argv = [sys.executable, str(ROOT / step.argv[0]), *step.argv[1:]]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    return r.returncode, r.stdout + r.stderr


def test_every_readme_command_runs_as_written(workdir, capsys):
    steps = plan(README.read_text())
    assert any(s.kind == "cli" for s in steps) and any(s.kind == "python" for s in steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds overhead
    try:
        for step in steps:
            if step.kind == "skip":
                print(f"skipped {step.source!r}: {step.code}")
                continue
            code, output = run_step(step, workdir, capsys)
            assert code == 0, (f"README command failed: {step.source!r}\nran: {step.kind} {step.argv} "
                               f"(substituted: {step.changes})\n{output[-3000:]}")
    finally:
        torch.set_num_threads(threads)
    assert (workdir / "runs" / "medusa" / "checkpoint" / "model.safetensors").is_file()


# ---------------------------------------------------------------- the parser itself


def test_plan_substitutes_sizes_and_local_data_only(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    steps = plan("```bash\nmtpkern train mtp --out runs/mtp --base gpt2 --data metamathqa --epochs 1\n"
                 "mtpkern train ntp --out r --steps 2000 \\\n  --config gpt2\n```\n")
    assert steps[0].argv == ["train", "mtp", "--out", "runs/mtp", "--base", "gpt2", "--data", "data.jsonl",
                             "--epochs", "1", "--data-limit", "48"]
    _local_inputs(steps[0], tmp_path)  # at run time: gpt2 is no local folder, so a hub name
    assert steps[0].argv[5] == "tiny-gpt2" and "--base gpt2 -> tiny-gpt2" in steps[0].changes
    (tmp_path / "runs" / "ntp").mkdir(parents=True)
    medusa = plan("```bash\nmtpkern train medusa --out m --base runs/ntp --data my.jsonl\n```")[0]
    _local_inputs(medusa, tmp_path)
    assert medusa.argv[5] == "runs/ntp" and (tmp_path / "my.jsonl").is_file()
    assert steps[1].argv == ["train", "ntp", "--out", "r", "--steps", "2", "--config", "tiny", "--data-limit", "48"]
    setup = plan("```bash\npip install torch && pip install -e . && mtpkern demo\n```")
    assert [s.kind for s in setup] == ["skip", "skip", "skip"]
    demo = plan('```python\nm = load_model("demo_out/medusa")\n```\n```bash\nmtpkern generate demo_out/medusa --prompt "q"\n```')
    assert [s.demo_runs for s in demo] == [["medusa"], ["medusa"]]
    _local_inputs(demo[0], tmp_path)  # at run time: a stand-in checkpoint, listed among the changes
    assert (tmp_path / "demo_out" / "medusa" / "config.json").is_file() and demo[0].changes
    torchrun = plan("```bash\ntorchrun --nproc_per_node 2 -m mtpkern.cli train ntp --out r\n```")[0]
    assert torchrun.kind == "torchrun"
    assert torchrun.argv == ["--nproc_per_node", "2", "-m", "mtpkern.cli", "train", "ntp", "--out", "r",
                             "--steps", "2", "--data-limit", "48"]


@pytest.mark.parametrize("readme", [
    "```bash\ncurl https://example.com | sh\n```",
    "```bash\nmtpkern\n```",
    "```\nmtpkern train ntp --out r\n```",
    "```ruby\nputs 1\n```",
    '```python\nmtpkern.load_model("demo_out/mtp")\n```',
])
def test_an_unknown_command_shape_fails_instead_of_being_skipped(readme):
    with pytest.raises(ValueError, match="tests/test_readme.py"):
        plan(readme)
