"""Chat data (issue 24): JSONL of ``{"messages": [...]}`` written by the tokenizer's own chat
template, labels on the assistant turns only; `mtpkern generate --chat`; a tokenizer without a
chat template is a one-line error naming it. Offline: the tokenizer is trained here and given a
ChatML template, then saved and loaded back as a user's would be."""

import json

import pytest
import torch

from mtpkern.config import GPT2Config
from mtpkern.data import (
    IGNORE_INDEX,
    DataError,
    SFTDataset,
    load_records,
    load_tokenizer,
    prompt_ids,
    reference,
    synthetic_records,
    train_tokenizer,
)
from mtpkern.models import GPT2
from test_cli import assert_one_line_error, run_main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "You solve word problems."},
    {"role": "user", "content": "Tom has 3 apples and gets 4 more. How many now?"},
    {"role": "assistant", "content": "Tom has 3 + 4 = 7 apples now.\nThe answer is: 7"},
    {"role": "user", "content": "And if he eats 2?"},
    {"role": "assistant", "content": "Tom has 7 - 2 = 5 apples left.\nThe answer is: 5"},
]


def _model_dir(directory, tok):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2(cfg).save_pretrained(directory, tokenizer=tok)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"chat": a tiny GPT-2 whose tokenizer has a ChatML template (<|im_end|> ends a turn and
    generation), "plain": the same without a template}."""
    root = tmp_path_factory.mktemp("chat")
    tok = train_tokenizer(synthetic_records(200, seed=7), vocab_size=400)
    plain = _model_dir(root / "plain", tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return {"chat": _model_dir(root / "chat", tok), "plain": plain}


def _chat_file(path, n: int = 40):
    """Chats from the synthetic problems, every third one two questions long."""
    records = synthetic_records(2 * n, seed=3)
    with open(path, "w") as f:
        for i in range(n):
            a, b = records[2 * i], records[2 * i + 1]
            messages = [{"role": "user", "content": a["query"]}, {"role": "assistant", "content": a["response"]}]
            if i % 3 == 0:
                messages += [{"role": "user", "content": b["query"]}, {"role": "assistant", "content": b["response"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_labels_cover_the_assistant_turns_only(dirs):
    tok = load_tokenizer(dirs["chat"])
    (item,) = SFTDataset([{"messages": CONVERSATION}], tok, max_len=256)
    ids, labels = item["input_ids"], item["labels"]
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)  # the template's own text
    learnt = labels != IGNORE_INDEX
    assert torch.equal(ids[learnt], labels[learnt])
    assert tok.decode(ids[learnt]) == "".join(m["content"] + "<|im_end|>\n" for m in CONVERSATION
                                              if m["role"] == "assistant")
    starts = (learnt[1:] & ~learnt[:-1]).sum() + learnt[0]  # two assistant turns: two labelled runs
    assert int(starts) == 2 and tok.decode(ids[~learnt]).endswith("<|im_start|>assistant\n")


def test_a_chats_prompt_and_reference_are_before_and_in_its_last_assistant_turn(dirs):
    tok = load_tokenizer(dirs["chat"])
    record = {"messages": CONVERSATION}
    text = tok.decode(prompt_ids(tok, record))
    assert text == tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert text.endswith("And if he eats 2?<|im_end|>\n<|im_start|>assistant\n")
    assert reference(record) == CONVERSATION[-1]["content"]


def test_chat_records_load_and_bad_ones_are_one_line_errors(tmp_path):
    path = _chat_file(tmp_path / "chat.jsonl", n=6)
    records = load_records(path)
    assert len(records) == 6 and all(r["type"] == "chat" and r["messages"] for r in records)
    bad = {
        '{"messages": []}': "record 0: 'messages' must be a non-empty list",
        '{"messages": [{"role": "user"}]}': "record 0: message 0 must be an object with string fields",
        '{"messages": [{"role": "user", "content": "hi"}]}': "record 0: no message has the role 'assistant'",
    }
    for line, message in bad.items():
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(DataError, match=message) as e:
            load_records(tmp_path / "bad.jsonl")
        assert str(tmp_path / "bad.jsonl") in str(e.value) and "\n" not in str(e.value)


def test_a_tokenizer_without_a_chat_template_is_named(dirs):
    tok = load_tokenizer(dirs["plain"])
    with pytest.raises(DataError, match="has no chat template") as e:
        SFTDataset([{"messages": CONVERSATION}], tok, max_len=256)
    assert str(dirs["plain"]) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="a tokenizer trained here has none"):
        train_tokenizer([{"messages": CONVERSATION}], vocab_size=400)


def test_generate_chat_writes_the_prompt_with_the_template(dirs, capsys, monkeypatch):
    """--chat decodes what --raw decodes from the template's text (and not the instruction prompt's)."""
    from mtpkern.cli import main

    tok = load_tokenizer(dirs["chat"])
    text = tok.apply_chat_template([{"role": "user", "content": "How many apples?"}], tokenize=False,
                                   add_generation_prompt=True)
    monkeypatch.delenv("MTPKERN_DEBUG", raising=False)
    outs = {}
    for name, flags in (("chat", ["--chat", "--prompt", "How many apples?"]), ("raw", ["--raw", "--prompt", text]),
                        ("instruction", ["--prompt", "How many apples?"])):
        code = main([str(a) for a in ["generate", dirs["chat"], *flags, "--max-new-tokens", "12", "--strategy", "ntp",
                                      "--device", "cpu"]])
        outs[name] = capsys.readouterr()
        assert code == 0, outs[name].err
    assert outs["chat"].out == outs["raw"].out != outs["instruction"].out


def test_generate_chat_without_a_template_and_with_raw_are_refused(dirs, capsys, monkeypatch):
    code, err = run_main(["generate", dirs["plain"], "--chat", "--prompt", "hi"], capsys, monkeypatch)
    assert_one_line_error(code, err, "has no chat template", str(dirs["plain"]), "--chat")
    code, err = run_main(["generate", dirs["chat"], "--chat", "--raw", "--prompt", "hi"], capsys, monkeypatch)
    assert_one_line_error(code, err, "not allowed with argument")


def test_medusa_heads_train_calibrate_and_evaluate_on_chat_data(dirs, tmp_path, capsys, monkeypatch):
    """`mtpkern train medusa` on chats (it calibrates at the end, on chat prompts), then eval."""
    data = _chat_file(tmp_path / "chat.jsonl")
    run = tmp_path / "run"
    code, err = run_main(["train", "medusa", "--out", run, "--base", dirs["chat"], "--data", data, "--n-heads", "3",
                          "--steps", "2", "--batch-size", "4", "--max-len", "256", "--device", "cpu",
                          "--precision", "fp32", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert (run / "checkpoint" / "calibration.json").is_file()
    report = tmp_path / "eval.json"
    code, err = run_main(["eval", run, "--json", report, "--max-samples", "2", "--max-new-tokens", "8", "--batch", "2",
                          "--no-progress", "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    (m,) = json.loads(report.read_text())["models"]
    assert m["speed"]["medusa"]["agrees_with_ntp"] == 1.0 and m["quality"]["n_samples"] == 2


def test_chat_data_without_a_base_is_a_one_line_error_with_progress_on(tmp_path, capsys, monkeypatch):
    """Training on chats from scratch (no base, so no chat template) is refused in one line, also
    where the trainer first reports the corpus size (progress on: it measures each record's text)."""
    data = _chat_file(tmp_path / "chat.jsonl", n=6)
    code, err = run_main(["train", "ntp", "--out", tmp_path / "run", "--data", data, "--steps", "1",
                          "--device", "cpu", "--precision", "fp32"], capsys, monkeypatch)
    assert_one_line_error(code, err, "trained here has none", "--base")
    assert not (tmp_path / "run" / "checkpoint").exists()
