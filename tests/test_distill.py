"""Self-distillation (mtpkern.distill): deterministic, resumable without duplicates, trainable,
and bad input reported in one line before any decoding."""

import json

import pytest
import torch

from mtpkern.data import DataError, load_records
from mtpkern.distill import SETTINGS_SUFFIX, distill
from mtpkern.train import train
from test_train import make_base, tiny_run

SETTINGS = dict(data="synthetic", limit=6, max_new_tokens=12, device="cpu", progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def greedy(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("greedy") / "d.jsonl"
    result = distill(base_dir, out=out, **SETTINGS)
    return out, result


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distill_writes_the_models_greedy_responses(greedy, base_dir):
    from mtpkern.data import format_prompt, load_tokenizer
    from mtpkern.generation import generate
    from mtpkern.hf_io import load_model

    out, result = greedy
    assert (result.written, result.kept, result.skipped, result.total) == (6, 0, 0, 6)
    records = _records(out)
    prompts = load_records("synthetic", limit=6)
    assert [r["source_index"] for r in records] == list(range(6))
    assert [r["query"] for r in records] == [p["query"] for p in prompts]
    assert [r["type"] for r in records] == [p["type"] for p in prompts]
    # the response is the model's own greedy continuation of the prompt
    model, tok = load_model(base_dir), load_tokenizer(base_dir)
    ids = torch.tensor(tok(format_prompt(prompts[2]["query"]), add_special_tokens=False)["input_ids"])
    tokens = generate(model, ids, max_new_tokens=12, eos_token_id=tok.eos_token_id).tokens
    tokens = tokens[:-1] if tokens[-1] == tok.eos_token_id else tokens
    assert records[2]["response"] == tok.decode(tokens, skip_special_tokens=True)
    assert all(r["response"] != p["response"] for r, p in zip(records, prompts))  # not the corpus' answers
    assert [r["reference"] for r in records] == [p["response"] for p in prompts]  # which are kept beside


def test_the_batch_size_changes_nothing(greedy, base_dir, tmp_path):
    """Prompts decoded a batch at a time (rows of different lengths, an uneven last batch) give
    what one at a time gives, greedy and sampled (row i from its own generator, seed + i)."""
    for temperature in (0.0, 1.0):
        outs = [distill(base_dir, out=tmp_path / f"{temperature}-{b}.jsonl", batch=b, temperature=temperature,
                        **SETTINGS).out for b in (1, 4)]
        one, four = (_records(tmp_path / o.split("/")[-1]) for o in outs)
        assert one == four and len(one) == 6
    assert _records(tmp_path / "0.0-4.jsonl") == _records(greedy[0])
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        distill(base_dir, out=tmp_path / "x.jsonl", batch=0, **SETTINGS)


def test_greedy_distillation_is_deterministic(greedy, base_dir, tmp_path):
    again = tmp_path / "again.jsonl"
    distill(base_dir, out=again, **SETTINGS)
    assert again.read_bytes() == greedy[0].read_bytes()


def test_sampled_distillation_is_seeded(base_dir, tmp_path, greedy):
    a, b, c = (distill(base_dir, out=tmp_path / f"{n}.jsonl", temperature=1.0, seed=s, **SETTINGS).out
               for n, s in (("a", 3), ("b", 3), ("c", 4)))
    read = lambda p: [r["response"] for r in _records(tmp_path / p.split("/")[-1])]  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c) and read(a) != [r["response"] for r in _records(greedy[0])]


def test_an_interrupted_distillation_resumes_without_duplicates(greedy, base_dir, tmp_path, capsys):
    full = greedy[0].read_bytes()
    out = tmp_path / "d.jsonl"
    distill(base_dir, out=out, **SETTINGS)
    lines = full.split(b"\n")
    # a run killed while writing record 3: two whole records, then half of the third
    out.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:15])
    result = distill(base_dir, out=out, **SETTINGS)
    assert (result.kept, result.written) == (2, 4)
    assert "dropped a half-written last line" in capsys.readouterr().err
    assert out.read_bytes() == full
    # run again: nothing to do, nothing duplicated
    result = distill(base_dir, out=out, **SETTINGS)
    assert (result.kept, result.written) == (6, 0) and out.read_bytes() == full


def test_training_reads_distilled_data_and_eval_scores_against_the_references(greedy, base_dir, tmp_path):
    """A run trained on self-distilled records is scored against the source's own answers (the
    ``reference`` field), not against the model's answers, which it reproduces exactly."""
    from mtpkern.eval import evaluate

    result = train(tiny_run(tmp_path / "run", "medusa", base_dir, data=str(greedy[0]), data_limit=None, n_heads=3,
                            steps=2, val_fraction=0.34))
    assert result.steps == 2
    report = evaluate([tmp_path / "run"], json_path=tmp_path / "e.json", device="cpu", max_samples=3, max_new_tokens=12,
                      max_batches=1, progress=False, hf_baseline=False, plots=False)
    m = report["models"][0]
    assert "self-distilled records: quality against the source's references" in m["validation"]["note"]
    assert m["speed"]["medusa"]["agrees_with_ntp"] == 1.0


def test_bad_input_is_a_one_line_error_before_decoding(base_dir, tmp_path, greedy):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"query": "  ", "response": "x"}) + "\n")
    no_query = tmp_path / "no_query.json"
    no_query.write_text(json.dumps([{"response": "x"}]))
    for source, message in [(empty, "no prompts"), (blank, "no prompts"), (no_query, "no string field 'query'")]:
        with pytest.raises(DataError, match=message) as e:
            distill(base_dir, source, tmp_path / "o.jsonl", progress=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ValueError, match="must name a .jsonl file"):
        distill(base_dir, "synthetic", tmp_path / "o.json")
    # an existing output with other settings, or one not written by distill, is never touched
    out = greedy[0]
    before = out.read_bytes()
    with pytest.raises(ValueError, match="distilled with max_new_tokens=12, not 20"):
        distill(base_dir, out=out, **dict(SETTINGS, max_new_tokens=20))
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"query": "q", "response": "r"}\n')
    with pytest.raises(ValueError, match="not written by mtpkern distill"):
        distill(base_dir, out=foreign, **SETTINGS)
    assert out.read_bytes() == before and foreign.read_text() == '{"query": "q", "response": "r"}\n'
    assert (out.parent / (out.name + SETTINGS_SUFFIX)).is_file()


def test_prompts_too_long_for_the_context_are_skipped_or_an_error(tmp_path):
    from mtpkern.data import train_tokenizer, synthetic_records
    from mtpkern.config import GPT2Config
    from mtpkern.models import GPT2

    tok = train_tokenizer(synthetic_records(200, seed=7), vocab_size=512)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"query": "Tom has 3 apples."}) + "\n" + json.dumps({"query": "word " * 200}) + "\n")
    for ctx in (64, 32):
        model_dir = tmp_path / f"ctx{ctx}"
        GPT2(GPT2Config(vocab_size=len(tok), n_positions=ctx, n_embd=32, n_layer=1, n_head=2,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(model_dir, tok)
    r = distill(tmp_path / "ctx64", data, tmp_path / "a.jsonl", max_new_tokens=8, device="cpu", progress=False)
    assert (r.written, r.skipped, r.total) == (1, 1, 2)
    # a prompt with less room than max_new_tokens is answered alone, with the room it has
    from mtpkern.data import format_prompt

    length = lambda q: len(tok(format_prompt(q), add_special_tokens=False)["input_ids"])  # noqa: E731
    long = next("word " * k for k in range(1, 200) if 64 - 32 < length("word " * k) < 64)  # room for 1-31 tokens
    near = tmp_path / "near.jsonl"
    near.write_text("\n".join(json.dumps({"query": q}) for q in ("Tom has 3 apples.", long, "Ann has 2.")) + "\n")
    r = distill(tmp_path / "ctx64", near, tmp_path / "c.jsonl", max_new_tokens=32, device="cpu", progress=False)
    assert (r.written, r.skipped) == (3, 0)
    assert [x["source_index"] for x in _records(tmp_path / "c.jsonl")] == [0, 1, 2]
    with pytest.raises(ValueError, match="no prompt of .* fits the model's context of 32 tokens"):
        distill(tmp_path / "ctx32", data, tmp_path / "b.jsonl", device="cpu", progress=False)


# ----------------------------------------------------------------------------- issue 22


def _cut_after(out, n: int) -> None:
    """The file as a run killed after its n-th record left it."""
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:n]))


def test_a_model_retrained_at_the_same_path_is_not_resumed(tmp_path):
    """Item 8: the model was named by its path alone, so a model retrained in place resumed a
    file of the old one's answers (rc 0, two models' records in one file)."""
    from mtpkern.data import load_tokenizer
    from mtpkern.hf_io import load_model

    model_dir = make_base(tmp_path / "model")
    out = tmp_path / "d.jsonl"
    distill(model_dir, out=out, **SETTINGS)
    _cut_after(out, 2)
    before = out.read_bytes()
    retrained = load_model(model_dir)
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    retrained.save_pretrained(model_dir, tokenizer=load_tokenizer(model_dir))
    with pytest.raises(ValueError) as e:
        distill(model_dir, out=out, **SETTINGS)
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "another model" in msg and "weights" in msg
    assert out.read_bytes() == before


def test_the_model_and_data_are_the_same_whatever_their_paths_spell(greedy, base_dir, tmp_path, monkeypatch):
    """Item 8: `./runs/ntp` and `runs/ntp` counted as different models; a model is its weights
    (a copy elsewhere resumes too) and a data file its prompts."""
    import shutil

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"query": r["query"]}) + "\n" for r in load_records("synthetic", limit=6)))
    shutil.copytree(base_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    settings = dict(SETTINGS, limit=None)
    first = distill("model", data="prompts.jsonl", out="d.jsonl", **{k: v for k, v in settings.items() if k != "data"})
    assert first.written == 6
    full = (tmp_path / "d.jsonl").read_bytes()
    for model, source in (("./model", "./prompts.jsonl"), (str(base_dir), str(data)), ("model/", "prompts.jsonl")):
        _cut_after(tmp_path / "d.jsonl", 3)
        r = distill(model, data=source, out="./d.jsonl", **{k: v for k, v in settings.items() if k != "data"})
        assert (r.kept, r.written) == (3, 3) and (tmp_path / "d.jsonl").read_bytes() == full


def test_settings_written_by_an_older_distill_are_refused_clearly(greedy, base_dir, tmp_path):
    """An older settings file names the model by its path only: its weights cannot be compared."""
    out = tmp_path / "old.jsonl"
    out.write_bytes(greedy[0].read_bytes())
    meta = out.with_name(out.name + SETTINGS_SUFFIX)
    meta.write_text(json.dumps(dict(model=str(base_dir), data="synthetic", max_new_tokens=12, temperature=0.0,
                                    top_p=1.0, seed=0, limit=6, dtype="float32")))
    with pytest.raises(ValueError) as e:
        distill(base_dir, out=out, **SETTINGS)
    msg = str(e.value)
    assert "\n" not in msg and str(meta) in msg and "older mtpkern distill" in msg and "choose another --out" in msg


def test_a_batch_larger_than_the_prompts_allocates_for_the_prompts(greedy, base_dir, tmp_path):
    """Item 11: --batch 100000 with 8 prompts sized the cache for 100000 rows (52 GB); a
    billion rows here would be 65 TB."""
    out = tmp_path / "big.jsonl"
    r = distill(base_dir, out=out, batch=10**9, **SETTINGS)
    assert r.written == 6 and out.read_bytes() == greedy[0].read_bytes()


@pytest.mark.parametrize("kw, kind, message", [
    (dict(temperature="0.5"), ValueError, "temperature must be a finite number >= 0, got '0.5'"),
    (dict(top_p="1"), ValueError, "top_p must be a number in (0, 1], got '1'"),
    (dict(seed="x"), ValueError, "seed must be an int in [0, 2**63), got 'x'"),
    (dict(seed=1.5), ValueError, "seed must be an int in [0, 2**63), got 1.5"),
    (dict(seed=-1, temperature=1.0), ValueError, "seed must be an int in [0, 2**63), got -1"),
])
def test_settings_of_the_wrong_kind_are_named(base_dir, tmp_path, kw, kind, message):
    """The same class as item 13: a string temperature read "'>=' not supported between
    instances of 'str' and 'int'", and a seed of any kind was accepted."""
    with pytest.raises(kind) as e:
        distill(base_dir, out=tmp_path / "x.jsonl", **dict(SETTINGS, **kw))
    assert str(e.value) == message
    assert not (tmp_path / "x.jsonl").exists()
