"""Tests for mtpkern.data: synthetic corpus, loading, tokenizer, dataset, batching, answers."""

import json
import random
import re
import string
import sys
import time
import types
import warnings

import pytest
import torch

from mtpkern.data import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    SYNTHETIC_KINDS,
    DataError,
    SFTDataset,
    answers_match,
    collate,
    extract_answer,
    format_prompt,
    load_records,
    load_tokenizer,
    split_records,
    synthetic_records,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def records():
    return synthetic_records(300, seed=1)


@pytest.fixture(scope="module")
def tokenizer(records):
    return train_tokenizer(records, vocab_size=600)


# ---------------------------------------------------------------- synthetic corpus

# Per kind: a pattern for the numbers in the query and the answer recomputed from them,
# written independently of the generator.
_REDERIVE = {
    "addition": (r"has (\d+) \w+\. \w+ gets (\d+) more", lambda a, b: a + b),
    "subtraction": (r"has (\d+) \w+\. \w+ gives (\d+) \w+ to", lambda a, b: a - b),
    "multiplication": (r"There are (\d+) boxes of \w+\. Each box holds (\d+)", lambda a, b: a * b),
    "division": (r"shares (\d+) \w+ equally among (\d+) friends", lambda a, b: a / b),
    "percentage": (r"costs (\d+) dollars\. .* a (\d+)% discount", lambda p, d: p - p * d / 100),
    "two_step": (r"buys (\d+) packs of \w+ with (\d+) \w+ in each pack\. \w+ gives away (\d+)",
                 lambda a, b, g: a * b - g),
    "rate_time": (r"at (\d+) miles per hour for (\d+) hours", lambda r, h: r * h),
    "rectangle_area": (r"(\d+) meters long and (\d+) meters wide\. What is the area", lambda l, w: l * w),
    "rectangle_perimeter": (r"(\d+) meters long and (\d+) meters wide\. What is the perimeter",
                            lambda l, w: 2 * (l + w)),
}


def test_rederive_covers_every_kind():
    assert set(_REDERIVE) == set(SYNTHETIC_KINDS)
    assert len(SYNTHETIC_KINDS) >= 6


def test_synthetic_answers_rederived_from_query():
    for i, rec in enumerate(synthetic_records(500, seed=7)):
        pattern, solve = _REDERIVE[rec["type"]]
        m = re.search(pattern, rec["query"])
        assert m, f"record {i} ({rec['type']}): query does not match its kind: {rec['query']!r}"
        expected = solve(*map(int, m.groups()))
        assert expected == int(expected) and expected > 0, f"record {i}: non-integer or non-positive answer"
        last = rec["response"].splitlines()[-1]
        assert re.fullmatch(r"The answer is: \d+", last), f"record {i}: bad final line {last!r}"
        assert extract_answer(rec["response"]) == expected, f"record {i}: {rec!r}"


def test_synthetic_solution_steps_are_correct():
    """Every "expression = value" in a solution step evaluates to its value."""
    n_checked = 0
    for i, rec in enumerate(synthetic_records(300, seed=3)):
        steps = rec["response"].splitlines()[:-1]
        assert 1 <= len(steps) <= 3
        for step in steps:
            m = re.search(r"([\d\s+\-*/()]*\d[\d\s+\-*/()]*) = (\d+)", step)
            assert m, f"record {i}: step without arithmetic: {step!r}"
            expr, value = m.group(1).strip(), int(m.group(2))
            # the pattern admits only digits, spaces, + - * / and parentheses, so eval is safe
            assert eval(expr, {"__builtins__": {}}) == value, f"record {i}: {step!r}"
            n_checked += 1
    assert n_checked >= 300


def test_synthetic_shape():
    recs = synthetic_records(900, seed=0)
    assert len(recs) == 900
    counts = {k: sum(r["type"] == k for r in recs) for k in SYNTHETIC_KINDS}
    assert set(counts.values()) == {100}, counts  # balanced kinds
    for rec in recs:
        assert set(rec) == {"query", "response", "type"}
        assert 15 <= len(rec["query"].split()) <= 40, rec["query"]
        assert max(map(int, re.findall(r"\d+", rec["query"] + rec["response"]))) <= 1000


def test_synthetic_reproducible_and_seeded():
    state = random.getstate()
    a, b, c = synthetic_records(200, seed=5), synthetic_records(200, seed=5), synthetic_records(200, seed=6)
    assert a == b
    assert a != c
    assert synthetic_records(9, seed=0) == synthetic_records(9, seed=0)
    assert random.getstate() == state, "synthetic_records must not use the global random state"
    assert synthetic_records(0) == []
    with pytest.raises(ValueError, match="n must be"):
        synthetic_records(-1)


def test_format_prompt():
    prompt = format_prompt("What is 2 + 2?")
    assert prompt == PROMPT_TEMPLATE.replace("{query}", "What is 2 + 2?")
    assert prompt.endswith("### Response:\n") and "### Instruction:\nWhat is 2 + 2?\n" in prompt


# ---------------------------------------------------------------- loading

def test_load_synthetic():
    assert load_records("synthetic", seed=2, limit=50) == synthetic_records(50, seed=2)
    assert len(load_records("synthetic")) == 2000


def test_json_and_jsonl_round_trip(tmp_path, records):
    recs = records[:20]
    (tmp_path / "list.json").write_text(json.dumps(recs))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": recs}))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    for name in ("list.json", "wrapped.json", "lines.jsonl"):
        assert load_records(str(tmp_path / name)) == recs, name
    assert load_records(tmp_path / "lines.jsonl", limit=5) == recs[:5]  # a Path works too


def test_metamathqa_shaped_jsonl(tmp_path):
    rows = [
        {"query": "What is 3 + 4?", "response": "3 + 4 = 7.\nThe answer is: 7", "type": "GSM_AnsAug",
         "original_question": "What is 3 + 4?"},
        {"query": "Half of 1?", "response": "The answer is: \\frac{1}{2}", "type": "MATH_Rephrased",
         "original_question": "Half of 1?"},
        {"query": "No type here", "response": "The answer is: 1"},
    ]
    path = tmp_path / "mmqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = load_records(str(path))
    assert [r["type"] for r in out] == ["GSM_AnsAug", "MATH_Rephrased", "unknown"]
    assert out[0]["original_question"] == "What is 3 + 4?"  # extra fields are kept
    assert extract_answer(out[1]["response"]) == 0.5


def test_error_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.json", "  \n"), ("b.jsonl", "\n\n")])
def test_error_empty_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match="empty"):
        load_records(str(tmp_path / name))


def test_error_no_records(tmp_path):
    (tmp_path / "z.json").write_text('{"data": []}')
    with pytest.raises(DataError, match="no records"):
        load_records(str(tmp_path / "z.json"))


def test_error_bad_json_line_names_file_and_line(tmp_path):
    good = json.dumps({"query": "q", "response": "r"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_records(str(path))
    (tmp_path / "bad.json").write_text('[{"query": "q",\n "response": ]')
    with pytest.raises(DataError, match=r"bad\.json:2: malformed JSON"):
        load_records(str(tmp_path / "bad.json"))
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(DataError, match="expected a list of records"):
        load_records(str(tmp_path / "scalar.json"))


@pytest.mark.parametrize("bad, match", [
    ({"query": "q"}, "record 1 is missing the field 'response'"),
    ({"response": "r"}, "record 1 is missing the field 'query'"),
    ({"query": 3, "response": "r"}, "record 1 field 'query' must be a string"),
    (["q", "r"], "record 1 is a list"),
])
def test_error_bad_record_names_field_and_index(tmp_path, bad, match):
    path = tmp_path / "recs.json"
    path.write_text(json.dumps([{"query": "q", "response": "r"}, bad]))
    with pytest.raises(DataError, match=match):
        load_records(str(path))


def test_error_unknown_dataset_and_bad_limit(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'wikitext'.*synthetic.*metamathqa"):
        load_records("wikitext")
    with pytest.raises(DataError, match="not a file"):
        load_records(str(tmp_path))
    with pytest.raises(DataError, match="limit"):
        load_records("synthetic", limit=0)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_metamathqa_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="needs the `datasets` package"):
        load_records("metamathqa")


def test_metamathqa_hub_unreachable(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match="could not load 'meta-math/MetaMathQA'.*offline"):
        load_records("metamathqa")


def test_metamathqa_with_fake_hub(monkeypatch):
    rows = [{"query": f"q{i}", "response": f"The answer is: {i}", "type": "GSM_AnsAug",
             "original_question": f"q{i}"} for i in range(10)]
    calls = {}

    class FakeDataset:
        def __init__(self, rows):
            self.rows = rows

        def shuffle(self, seed):
            calls["seed"] = seed
            return FakeDataset(self.rows[::-1])

        def select(self, indices):
            return FakeDataset([self.rows[i] for i in indices])

        def __len__(self):
            return len(self.rows)

        def __iter__(self):
            return iter(self.rows)

    def load_dataset(name, split):
        calls["name"], calls["split"] = name, split
        return FakeDataset(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = load_records("metamathqa", seed=4, limit=3)
    assert calls == {"name": "meta-math/MetaMathQA", "split": "train", "seed": 4}
    assert [r["query"] for r in out] == ["q9", "q8", "q7"]


# ---------------------------------------------------------------- splitting

def test_split_records(records):
    train, val = split_records(records, 0.1, seed=0)
    assert len(val) == 30 and len(train) == 270
    ids = lambda rs: {id(r) for r in rs}  # noqa: E731
    assert not ids(train) & ids(val) and ids(train) | ids(val) == ids(records)
    assert (train, val) == split_records(records, 0.1, seed=0)
    assert val != split_records(records, 0.1, seed=1)[1]
    for n in (2, 3, 5):
        tr, va = split_records(records[:n], 0.1)
        assert len(va) >= 1 and len(tr) >= 1 and len(tr) + len(va) == n
    assert split_records(records[:1], 0.5) == (records[:1], [])
    assert split_records([], 0.5) == ([], [])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            split_records(records, bad)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    text = "Ünïcode 🙂 never seen\ttext"  # byte-level: anything encodes and decodes back
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([{"query": "q", "response": "r"}], vocab_size=100)


def test_tokenizer_save_and_autotokenizer_round_trip(tokenizer, records, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [format_prompt(r["query"]) + r["response"] for r in records[:20]]
    texts.append("Ünïcode 🙂 x <|endoftext|>")
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(loaded) == len(tokenizer)
    assert load_tokenizer(tmp_path)(texts)["input_ids"] == tokenizer(texts)["input_ids"]


def test_load_tokenizer_sets_missing_pad(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    with pytest.raises(DataError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------- dataset and batching

def _n_prompt(tokenizer, rec):
    return len(tokenizer(format_prompt(rec["query"]), add_special_tokens=False)["input_ids"])


def test_sft_dataset_labels(tokenizer, records):
    recs = records[:40]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated at this length
        ds = SFTDataset(recs, tokenizer, max_len=512)
    assert len(ds) == len(recs)
    eos = tokenizer.eos_token_id
    for rec, item in zip(recs, (ds[i] for i in range(len(ds)))):
        ids, labels = item["input_ids"], item["labels"]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape and ids.dim() == 1
        n = _n_prompt(tokenizer, rec)
        assert (labels[:n] == IGNORE_INDEX).all()
        assert (labels[n:] == ids[n:]).all() and (labels[n:] != IGNORE_INDEX).all()
        assert ids[-1] == eos and (ids[:-1] != eos).all()
        # split tokenization equals tokenizing the whole text: what generation will see
        assert ids[:-1].tolist() == tokenizer(format_prompt(rec["query"]) + rec["response"])["input_ids"]


def test_sft_dataset_truncates_with_one_warning(tokenizer, records):
    recs = records[:60]
    full = [len(SFTDataset([r], tokenizer, 10_000)[0]["input_ids"]) for r in recs]
    prompts = [_n_prompt(tokenizer, r) for r in recs]
    max_len = sorted(full)[len(full) // 2]  # about half the sequences are too long
    assert max_len > max(prompts)  # so none is dropped
    with pytest.warns(UserWarning) as record:
        ds = SFTDataset(recs, tokenizer, max_len)
    n_long = sum(f > max_len for f in full)
    assert n_long > 0 and len(record) == 1 and f"truncated {n_long} of 60" in str(record[0].message)
    assert ds.n_truncated == n_long and len(ds) == 60
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert max(lengths) == max_len
    assert all(min(f, max_len) == n for f, n in zip(full, lengths))


def test_sft_dataset_drops_prompts_that_fill_max_len(tokenizer, records):
    recs = records[:60]
    prompts = [_n_prompt(tokenizer, r) for r in recs]
    max_len = sorted(prompts)[len(prompts) // 2]
    n_drop = sum(p >= max_len for p in prompts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = SFTDataset(recs, tokenizer, max_len)
    assert [str(w.message) for w in caught if "dropped" in str(w.message)] == [
        f"SFTDataset: dropped {n_drop} of 60 records whose prompt alone fills max_len={max_len}"]
    assert n_drop > 0 and ds.n_dropped == n_drop and len(ds) == 60 - n_drop
    for i in range(len(ds)):  # every kept item has at least one supervised token
        assert (ds[i]["labels"] != IGNORE_INDEX).any() and len(ds[i]["input_ids"]) <= max_len
    with pytest.raises(DataError, match="no record fits"), pytest.warns(UserWarning):
        SFTDataset(recs, tokenizer, min(prompts))
    with pytest.raises(ValueError, match="max_len"):
        SFTDataset(recs, tokenizer, 1)


def test_collate(tokenizer, records):
    ds = SFTDataset(records[:5], tokenizer, 512)
    items = [ds[i] for i in range(5)]
    pad = tokenizer.pad_token_id
    batch = collate(items, pad_id=pad)
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) > 1  # padding is actually exercised
    B, L = 5, max(lengths)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].shape == (B, L) and batch[key].dtype == torch.long
    for b, (it, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][b, :n], it["input_ids"])
        assert torch.equal(batch["labels"][b, :n], it["labels"])
        assert (batch["input_ids"][b, n:] == pad).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: collate(b, pad))
    assert sum(x["attention_mask"].sum().item() for x in loader) == sum(len(d["input_ids"]) for d in ds)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad)


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("text, value", [
    ("2 + 3 = 5.\nThe answer is: 5", 5.0),
    ("The answer is: 1,234", 1234.0),
    ("The answer is: -7", -7.0),
    ("The answer is: 3.25", 3.25),
    ("The answer is: 3/4", 0.75),
    ("The answer is: -3 / 4.", -0.75),
    ("The answer is: 18.", 18.0),
    ("The answer is: $1,234.50", 1234.5),
    ("The answer is: \\frac{1}{8}", 0.125),
    ("The answer is: 12 dollars", 12.0),
    ("The answer is: 1. Wait. The answer is: 2", 2.0),  # the last mark counts
    ("the answer is 42", 42.0),
    ("no answer here 42", None),
    ("The answer is: x = 3", None),
    ("The answer is: 5x", None),
    ("The answer is: 1/0", None),
    ("The answer is:", None),
])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_answers_match():
    assert answers_match("so The answer is: 1,000", "The answer is: 1000")
    assert answers_match("The answer is: 0.5", "The answer is: 1/2")
    assert answers_match("The answer is: 3.0000000001", "The answer is: 3")
    assert not answers_match("The answer is: 3.01", "The answer is: 3")
    assert answers_match("The answer is: 3.01", "The answer is: 3", tol=0.01)
    assert not answers_match("The answer is: -3", "The answer is: 3")
    assert not answers_match("I don't know", "The answer is: 3")
    assert not answers_match("The answer is: 3", "no reference")


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"query": "a", "response": "b"}\n{"query": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text"):
        load_records(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name):
    path = tmp_path / name
    text = '{"query": "a", "response": "b"}' if name.endswith("l") else '[{"query": "a", "response": "b"}]'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_records(path)[0]["query"] == "a"


def test_load_tokenizer_refuses_a_missing_or_corrupt_tokenizer(tokenizer, tmp_path):
    from mtpkern.config import GPT2Config
    from mtpkern.models import GPT2

    ckpt = tmp_path / "run" / "checkpoint"
    GPT2(GPT2Config.tiny(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2)).save_pretrained(ckpt)
    with pytest.raises(DataError, match="has no tokenizer"):  # never an empty fallback tokenizer
        load_tokenizer(tmp_path / "run")
    tokenizer.save_pretrained(ckpt)
    assert len(load_tokenizer(tmp_path / "run")) == len(tokenizer)  # a run directory works too
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(DataError, match=r"checkpoint/tokenizer.json is corrupt"):
        load_tokenizer(ckpt)


# ---------------------------------------------------------------- very long records


def _long_text(n_chars: int, seed: int = 0) -> str:
    """Words of 1 to 8 letters, then one run of 100,000 letters without a space."""
    rng = random.Random(seed)
    letters = "".join(rng.choices(string.ascii_lowercase, k=n_chars))
    words, i = [], 0
    while i < n_chars:
        n = rng.randint(1, 8)
        words.append(letters[i : i + n])
        i += n + 1
    return " ".join(words) + " " + "".join(rng.choices(string.ascii_letters, k=100_000))


def test_train_tokenizer_bounds_very_long_texts_and_says_so(records):
    """A 2 MB record took a minute (and a 20 MB one never finished): the tokenizer now learns from
    the first TOKENIZER_TEXT_LIMIT characters of each text, with long runs without a space cut up."""
    from mtpkern.data import TOKENIZER_TEXT_LIMIT

    long = _long_text(2_000_000)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=rf"1 of 301 records is longer than {TOKENIZER_TEXT_LIMIT} characters: "
                                         rf"the tokenizer learns from its first {TOKENIZER_TEXT_LIMIT}"):
        tok = train_tokenizer(records + [{"query": long, "response": "x"}], vocab_size=600)
    assert time.perf_counter() - start < 8
    assert tok.decode(tok(records[0]["query"])["input_ids"]) == records[0]["query"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary records: no warning, and the same tokenizer as before
        same = train_tokenizer(records, vocab_size=600)
    assert same.get_vocab() == train_tokenizer(records, vocab_size=600).get_vocab()


def test_sft_dataset_cuts_a_very_long_text_before_tokenizing(tokenizer):
    """Only max_len tokens of a record are used: a 2 MB text is cut before it is tokenized
    (seconds and hundreds of MB before), and the tokens kept are those of the whole text."""
    long = _long_text(2_000_000)
    start = time.perf_counter()
    with pytest.warns(UserWarning):
        ds = SFTDataset([{"query": "q", "response": long}, {"query": long, "response": "r"}], tokenizer, 64)
    assert time.perf_counter() - start < 3
    assert len(ds) == 1 and ds.n_dropped == 1 and ds.n_truncated == 1
    medium = long[:30_000]  # long enough to be cut, short enough to tokenize whole here
    with pytest.warns(UserWarning):
        ds = SFTDataset([{"query": "q", "response": medium}], tokenizer, 64)
    whole = tokenizer(format_prompt("q"), add_special_tokens=False)["input_ids"]
    whole += tokenizer(medium, add_special_tokens=False)["input_ids"]
    assert ds[0]["input_ids"].tolist() == whole[:64]


def test_sft_dataset_of_no_records_is_empty(tokenizer):
    assert len(SFTDataset([], tokenizer, 32)) == 0
