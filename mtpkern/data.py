"""Data for supervised fine-tuning: records, prompts, tokenizer, dataset and batching.

A record follows the MetaMathQA schema, ``{"query": str, "response": str, "type": str}``,
where the response ends in ``"The answer is: N"``. Records come from one of three sources
(see :func:`load_records`): the embedded synthetic corpus of arithmetic word problems (the
offline default), the ``meta-math/MetaMathQA`` dataset on the Hugging Face hub, or a local
``.json`` / ``.jsonl`` file in the same schema.

Each record becomes one training sequence ``tokens(prompt) + tokens(response) + [eos]``
whose labels are ``-100`` on the prompt, so the loss only covers the response.

A file's record may instead be a chat, ``{"messages": [{"role": ..., "content": ...}, ...]}``
with at least one ``"assistant"`` turn: it is formatted by the tokenizer's own chat template
(``apply_chat_template``), and its labels cover the assistant turns only (each with the
template's end-of-turn text); everything else is ``-100`` (:func:`chat_segments`).
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path

import torch

from mtpkern.checkpoint import CheckpointError, is_local, resolve_checkpoint

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:\n"
)
EOS_TOKEN = "<|endoftext|>"
IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips by default
KNOWN_SOURCES = ("synthetic", "metamathqa")
METAMATHQA_HUB_ID = "meta-math/MetaMathQA"
DEFAULT_SYNTHETIC_SIZE = 2000


class DataError(ValueError):
    """Bad data source or record, reported before training starts."""


def format_prompt(query: str) -> str:
    """The instruction prompt the model sees before its response."""
    return PROMPT_TEMPLATE.format(query=query)


# --------------------------------------------------------------------------------------
# Synthetic corpus: short arithmetic word problems with step-by-step solutions.
# The wording is deliberately fixed per kind so that a tiny model learns it quickly and
# extra heads can predict several tokens ahead; only names, objects and numbers vary.
# --------------------------------------------------------------------------------------

_NAMES = (("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Lisa", "She"), ("Sam", "He"),
          ("Maria", "She"), ("Jack", "He"), ("Emma", "She"), ("Leo", "He"), ("Mia", "She"))
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells")
_GOODS = ("shirt", "lamp", "bike", "chair", "jacket", "clock")
_VEHICLES = ("car", "bus", "train", "truck", "boat")
_PLACES = ("garden", "room", "field", "yard", "pool")


def _addition(rng: random.Random) -> tuple[str, str, int]:
    (name, pron), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 200), rng.randint(2, 100)
    c = a + b
    query = (f"{name} has {a} {item}. {pron} gets {b} more {item} from a friend. "
             f"How many {item} does {name} have now?")
    return query, f"{name} has {a} + {b} = {c} {item} now.", c


def _subtraction(rng: random.Random) -> tuple[str, str, int]:
    (name, pron), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(10, 300)
    b = rng.randint(1, a - 1)
    c = a - b
    query = (f"{name} has {a} {item}. {pron} gives {b} {item} to a friend. "
             f"How many {item} does {name} have left?")
    return query, f"{name} has {a} - {b} = {c} {item} left.", c


def _multiplication(rng: random.Random) -> tuple[str, str, int]:
    item = rng.choice(_ITEMS)
    a, b = rng.randint(2, 12), rng.randint(2, 25)
    c = a * b
    query = (f"There are {a} boxes of {item}. Each box holds {b} {item}. "
             f"How many {item} are there in all the boxes?")
    return query, f"There are {a} * {b} = {c} {item} in total.", c


def _division(rng: random.Random) -> tuple[str, str, int]:
    (name, _), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    b, c = rng.randint(2, 12), rng.randint(2, 25)
    a = b * c  # built from the quotient so the division is exact
    query = (f"{name} shares {a} {item} equally among {b} friends. "
             f"How many {item} does each friend get?")
    return query, f"Each friend gets {a} / {b} = {a // b} {item}.", a // b


def _percentage(rng: random.Random) -> tuple[str, str, int]:
    good = rng.choice(_GOODS)
    # price = 20k and a discount that is a multiple of 5 percent keep every step an integer
    price, pct = 20 * rng.randint(1, 20), rng.choice((10, 20, 25, 30, 40, 50, 75))
    off = price * pct // 100
    c = price - off
    query = (f"A {good} costs {price} dollars. The store gives a {pct}% discount. "
             f"What is the price of the {good} after the discount?")
    steps = (f"The discount is {price} * {pct} / 100 = {off} dollars.\n"
             f"The price after the discount is {price} - {off} = {c} dollars.")
    return query, steps, c


def _two_step(rng: random.Random) -> tuple[str, str, int]:
    (name, pron), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    total = a * b
    g = rng.randint(1, total - 1)
    c = total - g
    query = (f"{name} buys {a} packs of {item} with {b} {item} in each pack. "
             f"{pron} gives away {g} {item}. How many {item} does {name} have left?")
    steps = f"{name} buys {a} * {b} = {total} {item}.\n{pron} has {total} - {g} = {c} {item} left."
    return query, steps, c


def _rate_time(rng: random.Random) -> tuple[str, str, int]:
    vehicle = rng.choice(_VEHICLES)
    rate, hours = 5 * rng.randint(2, 16), rng.randint(2, 9)
    c = rate * hours
    query = (f"A {vehicle} travels at {rate} miles per hour for {hours} hours. "
             f"How many miles does the {vehicle} travel?")
    return query, f"The {vehicle} travels {rate} * {hours} = {c} miles.", c


def _rectangle_area(rng: random.Random) -> tuple[str, str, int]:
    place = rng.choice(_PLACES)
    length, width = rng.randint(2, 30), rng.randint(2, 20)
    c = length * width
    query = (f"A rectangular {place} is {length} meters long and {width} meters wide. "
             f"What is the area of the {place} in square meters?")
    return query, f"The area is {length} * {width} = {c} square meters.", c


def _rectangle_perimeter(rng: random.Random) -> tuple[str, str, int]:
    place = rng.choice(_PLACES)
    length, width = rng.randint(2, 30), rng.randint(2, 20)
    c = 2 * (length + width)
    query = (f"A rectangular {place} is {length} meters long and {width} meters wide. "
             f"What is the perimeter of the {place} in meters?")
    return query, f"The perimeter is 2 * ({length} + {width}) = {c} meters.", c


SYNTHETIC_KINDS = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "division": _division,
    "percentage": _percentage,
    "two_step": _two_step,
    "rate_time": _rate_time,
    "rectangle_area": _rectangle_area,
    "rectangle_perimeter": _rectangle_perimeter,
}


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` arithmetic word problems in the MetaMathQA schema, reproducible from ``seed``.

    Kinds are balanced (each appears ``n // len(SYNTHETIC_KINDS)`` or one more times) in a
    seeded random order. Each response is 1-2 computed steps then ``"The answer is: N"``.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)  # local generator: never touches the global random state
    names = list(SYNTHETIC_KINDS)
    kinds = [names[i % len(names)] for i in range(n)]
    rng.shuffle(kinds)
    records = []
    for kind in kinds:
        query, steps, answer = SYNTHETIC_KINDS[kind](rng)
        records.append({"query": query, "response": f"{steps}\nThe answer is: {answer}", "type": kind})
    return records


# --------------------------------------------------------------------------------------
# Loading and validating records.
# --------------------------------------------------------------------------------------

def load_records(source: str | os.PathLike, *, seed: int = 0, limit: int | None = None,
                 split: str = "train") -> list[dict]:
    """Records from ``source``, validated.

    ``source`` is ``"synthetic"`` (``limit`` records, 2000 by default, generated from
    ``seed``), ``"metamathqa"`` (the hub dataset via the optional ``datasets`` package,
    shuffled with ``seed`` before taking ``limit``; ``split`` picks the hub split), or a
    path to a ``.json`` file (a list of records or ``{"data": [...]}``) or a ``.jsonl``
    file (one record per line); a file's first ``limit`` records are kept in file order.
    Every record must have string ``"query"`` and ``"response"`` fields; ``"type"``
    defaults to ``"unknown"`` and extra fields are kept. Raises :class:`DataError`.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    path = Path(source)
    if source == "synthetic":
        records = synthetic_records(DEFAULT_SYNTHETIC_SIZE if limit is None else limit, seed)
    elif source == "metamathqa":
        records = _load_metamathqa(split, seed, limit)
    elif path.is_file():
        records = _read_json_file(path)[:limit]
    elif path.exists():
        raise DataError(f"data source {str(source)!r} is not a file")
    elif path.suffix in (".json", ".jsonl") or len(path.parts) > 1:
        raise DataError(f"data file not found: {str(source)!r}")
    else:
        raise DataError(f"unknown dataset {str(source)!r}: expected one of {KNOWN_SOURCES} "
                        "or a path to a .json / .jsonl file")
    return _validate(records, str(source))


def load_prompts(source: str | os.PathLike, *, seed: int = 0, limit: int | None = None) -> list[dict]:
    """The prompts of ``source`` (as for :func:`load_records`), for generating responses: a
    file's records need a non-empty string ``"query"`` only (a ``"response"`` is ignored).
    A source without a prompt is a :class:`DataError`."""
    path = Path(source)
    if source in KNOWN_SOURCES or not path.is_file():
        records = load_records(source, seed=seed, limit=limit)
    else:
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise DataError(f"limit must be a positive int or None, got {limit!r}")
        try:
            records = _read_json_file(path)[:limit]
        except DataError as e:
            if "holds no records" in str(e) or "is empty" in str(e):
                raise DataError(f"{path}: no prompts to answer (the file holds no records)") from None
            raise
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("query"), str):
            raise DataError(f"{source}: record {i} has no string field 'query' (the prompt)")
        if rec["query"].strip():
            out.append(dict(rec, type=rec.get("type", "unknown")))
    if not out:
        raise DataError(f"{source}: no prompts to answer (every 'query' is empty)")
    return out


def _load_metamathqa(split: str, seed: int, limit: int | None) -> list[dict]:
    try:
        import datasets  # optional dependency, imported only when asked for
    except ImportError as e:
        raise DataError("source 'metamathqa' needs the `datasets` package (pip install datasets); "
                        "use source='synthetic' or a local .json / .jsonl file offline") from e
    try:
        ds = datasets.load_dataset(METAMATHQA_HUB_ID, split=split)
    except Exception as e:  # network, offline mode, missing split: all mean "cannot load"
        raise DataError(f"could not load {METAMATHQA_HUB_ID!r} (split {split!r}) from the Hugging Face "
                        f"hub: {e}. Is the hub reachable (HF_HUB_OFFLINE unset)?") from e
    ds = ds.shuffle(seed=seed)  # the file is grouped by type; a prefix would be one type only
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def _read_json_file(path: Path) -> list:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte order mark is fine
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"data file {str(path)!r} is empty")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
        records = data["data"] if isinstance(data, dict) and "data" in data else data
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of records or {{\"data\": [...]}}, "
                            f"got {type(data).__name__}")
    if not records:
        raise DataError(f"data file {str(path)!r} holds no records")
    return records


def _validate(records: list, source: str) -> list[dict]:
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{source}: record {i} is a {type(rec).__name__}, expected an object")
        if "messages" in rec:
            _check_messages(rec["messages"], f"{source}: record {i}")
            out.append(dict(rec, type=rec.get("type", "chat")))
            continue
        for field in ("query", "response"):
            if field not in rec:
                raise DataError(f"{source}: record {i} is missing the field {field!r}")
            if not isinstance(rec[field], str):
                raise DataError(f"{source}: record {i} field {field!r} must be a string, "
                                f"got {type(rec[field]).__name__}")
        rec = dict(rec)
        rec.setdefault("type", "unknown")
        out.append(rec)
    return out


def _check_messages(messages, where: str) -> None:
    """A chat record's ``messages``: a non-empty list of ``{"role": str, "content": str}`` with an
    assistant turn to learn from; anything else a one-line DataError starting with ``where``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be an object with string fields 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no message has the role 'assistant' (the turns a model learns)")


def is_chat(record: dict) -> bool:
    """Whether a record is a chat (``messages``) rather than a ``query`` / ``response`` pair."""
    return "messages" in record


def split_records(records: list, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Seeded shuffle, then ``round(len * val_fraction)`` records (at least 1, at most
    ``len - 1``, when ``len >= 2``) go to validation and the rest to training."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(records) * val_fraction)), len(records) - 1) if len(records) >= 2 else 0
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


# --------------------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------------------

TOKENIZER_TEXT_LIMIT = 65_536  # characters of one record that a new tokenizer learns from
_TOKENIZER_RUN = 1_000  # BPE training time grows with the square of a word: longer runs are cut up
_LONG_RUN = re.compile(r"\S{%d,}" % (_TOKENIZER_RUN + 1))


def record_text(record: dict) -> str:
    """A record's whole text: prompt + response, or a chat's turns one per line."""
    if is_chat(record):
        return "\n".join(m["content"] for m in record["messages"])
    return format_prompt(record["query"]) + record["response"]


def _tokenizer_texts(records: list[dict]):
    """The texts a tokenizer learns from: prompt + response of each record, its first
    TOKENIZER_TEXT_LIMIT characters, cut inside runs of over _TOKENIZER_RUN characters without
    whitespace (an ordinary record is one piece, as it is)."""
    for r in records:
        text = record_text(r)[:TOKENIZER_TEXT_LIMIT]
        start = 0
        for m in _LONG_RUN.finditer(text):
            for cut in range(m.start() + _TOKENIZER_RUN, m.end(), _TOKENIZER_RUN):
                yield text[start:cut]
                start = cut
        yield text[start:]


def check_tokenizer_records(records: list[dict]) -> None:
    """The records a tokenizer can be trained on here: some, and no chats (SFTDataset would
    refuse those only after the training). Checked before any work starts."""
    if not records:
        raise DataError("cannot train a tokenizer on zero records")
    if any(is_chat(r) for r in records):
        raise DataError("chat records ('messages') are formatted with a tokenizer's chat template, and a tokenizer "
                        "trained here has none: start from a base (--base) whose tokenizer has one")


def train_tokenizer(records: list[dict], vocab_size: int = 2048, *, min_frequency: int = 2,
                    progress: bool = False):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on prompt + response texts.

    ``<|endoftext|>`` is the only special token (id 0), used as eos and pad. Byte-level
    means any text encodes without an unknown token. Returns a
    ``transformers.PreTrainedTokenizerFast`` that ``save_pretrained`` / ``AutoTokenizer``
    round-trip. The work is bounded: it learns from the first TOKENIZER_TEXT_LIMIT characters
    of each record (a warning says how many records were longer). ``progress``: the trainer's
    own progress bars.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= n_bytes:
        raise ValueError(f"vocab_size must exceed {n_bytes} (the byte alphabet plus eos), got {vocab_size}")
    check_tokenizer_records(records)
    n_long = sum(len(record_text(r)) > TOKENIZER_TEXT_LIMIT for r in records)
    if n_long:
        warnings.warn(f"{n_long} of {len(records)} records {'is' if n_long == 1 else 'are'} longer than "
                      f"{TOKENIZER_TEXT_LIMIT} characters: the tokenizer learns from "
                      f"{'its' if n_long == 1 else 'their'} first {TOKENIZER_TEXT_LIMIT} only", stacklevel=2)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(_tokenizer_texts(records), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast tokenizer, or GPT-2's vocab + merges


def has_tokenizer(directory) -> bool:
    """Whether a local directory holds tokenizer files."""
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(name_or_dir):
    """``AutoTokenizer.from_pretrained`` with ``pad_token = eos_token`` if unset.

    ``name_or_dir``: a hub name, a local checkpoint or run directory (resolved like
    :func:`mtpkern.load_model`), or a ``.gguf`` file (the tokenizer it carries). A local directory without tokenizer files, a corrupt
    ``tokenizer.json`` or a tokenizer without an eos token is a :class:`DataError` naming the
    directory: an empty fallback tokenizer would encode every text to nothing.
    """
    from transformers import AutoTokenizer

    where = str(name_or_dir)
    if where.lower().endswith(".gguf"):
        gguf = Path(where)
        if not gguf.is_file():
            raise DataError(f"no such GGUF file: {where!r}")
        return _checked_tokenizer(lambda: AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), where)
    if is_local(name_or_dir):
        if not has_tokenizer(Path(name_or_dir)):  # a run directory: its checkpoint holds the tokenizer
            try:
                name_or_dir = resolve_checkpoint(name_or_dir)[0]
            except CheckpointError as e:
                raise DataError(f"could not load a tokenizer: {e}") from None
        name_or_dir = Path(name_or_dir)
        where = str(name_or_dir)
        if not has_tokenizer(name_or_dir):
            raise DataError(f"{where} has no tokenizer ({' or '.join(TOKENIZER_FILES)} is missing)")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # name a damaged file, not a parser's line
            f = name_or_dir / name
            if f.is_file():
                try:
                    json.loads(f.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    why = e.msg if isinstance(e, json.JSONDecodeError) else e.reason
                    raise DataError(f"{f} is corrupt: {why}") from None
    return _checked_tokenizer(lambda: AutoTokenizer.from_pretrained(name_or_dir), where)


def _checked_tokenizer(load, where: str):
    """``load()``'s tokenizer, checked (not empty, an eos token) and padded with eos."""
    try:
        tok = load()
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many kinds
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load a tokenizer from {where!r}: {detail}") from None
    if len(tok) == 0:
        raise DataError(f"the tokenizer in {where!r} is empty")
    if tok.eos_token is None:
        raise DataError(f"tokenizer {where!r} has no eos token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------
# Chat templates.
# --------------------------------------------------------------------------------------

def require_chat_template(tokenizer, why: str) -> None:
    """A one-line DataError naming the tokenizer (the folder it came from) unless it has a chat
    template; ``why`` says what needs one."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"the tokenizer {name!r} has no chat template (chat_template in its tokenizer_config.json "
                        f"or chat_template.jinja): {why}")


def _render(tokenizer, messages: list, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(tokenizer, messages: list) -> list[tuple[str, bool]]:
    """The conversation as the tokenizer's chat template writes it, cut into ``(text,
    assistant)`` pieces: an assistant turn's piece runs from where the template's generation
    prompt for it ends to where the turn ends (its end-of-turn text included: the model learns
    to stop). Found by rendering each beginning of the conversation, which must begin the whole
    rendering (a template that rewrites earlier turns is a one-line DataError)."""
    full = _render(tokenizer, messages, False)
    pieces, start = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(after) and after.startswith(before) and len(before) >= start):
            raise DataError(f"the chat template of tokenizer {tokenizer.name_or_path!r} does not write a "
                            "conversation's beginning as the beginning of the whole: its assistant turns cannot be "
                            "found")
        pieces += [(full[start:len(before)], False), (full[len(before):len(after)], True)]
        start = len(after)
    pieces.append((full[start:], False))
    return [(text, assistant) for text, assistant in pieces if text]


def chat_prompt_ids(tokenizer, messages: list) -> list[int]:
    """Token ids of ``messages`` as the chat template writes them, followed by its generation
    prompt (the assistant's turn begins next): what ``mtpkern generate --chat`` decodes from."""
    require_chat_template(tokenizer, "chat prompts are written with it")
    return tokenizer(_render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """The prompt of a record, tokenized as the model is asked at generation time: the
    instruction template around ``query``, or a chat's turns before its last assistant turn."""
    if not is_chat(record):
        return tokenizer(format_prompt(record["query"]), add_special_tokens=False)["input_ids"]
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return chat_prompt_ids(tokenizer, messages[:last])


def reference(record: dict) -> str:
    """The answer a record holds: its ``response``, or a chat's last assistant turn."""
    if not is_chat(record):
        return record["response"]
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"][-1]


# --------------------------------------------------------------------------------------
# Dataset and batching.
# --------------------------------------------------------------------------------------

class SFTDataset(torch.utils.data.Dataset):
    """Tokenized records for supervised fine-tuning.

    Item ``i`` is ``{"input_ids": [L], "labels": [L]}`` with ``input_ids = prompt + response
    + [eos]`` and ``labels`` equal to ``input_ids`` except ``-100`` on the prompt; a chat
    record's are its conversation as the tokenizer's chat template writes it, labelled on the
    assistant turns only (:func:`chat_segments`). Labels are
    aligned with inputs (the Hugging Face convention): the loss shifts them by one. Prompt
    and response (a chat's pieces) are tokenized separately, as at generation time, where the
    model continues the tokenized prompt. Sequences over ``max_len`` are cut to ``max_len`` (one
    warning for the whole dataset); records whose prompt alone fills ``max_len`` are dropped (warned).
    """

    def __init__(self, records: list[dict], tokenizer, max_len: int):
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token")
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_truncated = self.n_dropped = 0
        for ids, labels in _sequences(records, tokenizer, text_limit(tokenizer, max_len)):
            if labels[:max_len].count(IGNORE_INDEX) == min(len(labels), max_len):  # nothing to learn inside max_len
                self.n_dropped += 1
                continue
            if len(ids) > max_len:
                self.n_truncated += 1
                ids, labels = ids[:max_len], labels[:max_len]
            self.examples.append((torch.tensor(ids), torch.tensor(labels)))  # int lists -> int64
        if self.n_dropped:
            warnings.warn(f"SFTDataset: dropped {self.n_dropped} of {len(records)} records whose prompt "
                          f"alone fills max_len={max_len}", stacklevel=2)
        if self.n_truncated:
            warnings.warn(f"SFTDataset: truncated {self.n_truncated} of {len(records)} sequences to "
                          f"max_len={max_len} (their eos is cut off)", stacklevel=2)
        if records and not self.examples:
            raise DataError(f"no record fits max_len={max_len}: every prompt fills it")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        input_ids, labels = self.examples[i]
        return {"input_ids": input_ids, "labels": labels}


def _sequences(records: list[dict], tokenizer, limit: int) -> list[tuple[list[int], list[int]]]:
    """Per record, its whole token ids and labels (see :class:`SFTDataset`); every text cut at
    ``limit`` characters first (:func:`text_limit`)."""
    eos = tokenizer.eos_token_id
    plain = [r for r in records if not is_chat(r)]
    if len(plain) < len(records):
        require_chat_template(tokenizer, "chat records ('messages') are formatted with it")
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
    prompts = encode([format_prompt(r["query"])[:limit] for r in plain])
    responses = encode([r["response"][:limit] for r in plain])
    pairs = iter([(p + r + [eos], [IGNORE_INDEX] * len(p) + r + [eos]) for p, r in zip(prompts, responses)])
    return [_chat_sequence(tokenizer, r["messages"], limit) if is_chat(r) else next(pairs) for r in records]


def _chat_sequence(tokenizer, messages: list, limit: int) -> tuple[list[int], list[int]]:
    pieces = chat_segments(tokenizer, [dict(m, content=m["content"][:limit]) for m in messages])
    ids: list[int] = []
    labels: list[int] = []
    for (_, assistant), piece in zip(pieces, tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"]):
        ids += piece
        labels += piece if assistant else [IGNORE_INDEX] * len(piece)
    return ids, labels


def text_limit(tokenizer, max_len: int) -> int:
    """Characters of a text that surely hold more than ``max_len`` tokens: no token covers more
    bytes than the longest in the vocabulary (byte-level BPE spells a token one character per
    byte), and a character is at least a byte. SFTDataset cuts texts there before tokenizing:
    only the first ``max_len`` tokens are used, and a 20 MB record would take minutes and GBs.
    The margin covers the last word, which the cut changes. Anything that tokenizes a record
    only to keep or skip its first tokens can cut it here too."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return (max_len + 16) * max(longest, 1)


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a list of items to ``[B, Lmax]``: ``input_ids`` with ``pad_id``, ``labels``
    with ``-100``, and ``attention_mask`` 1 on real tokens, 0 on padding."""
    if not batch:
        raise ValueError("collate got an empty batch")
    lengths = [len(item["input_ids"]) for item in batch]
    B, L = len(batch), max(lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, (item, n) in enumerate(zip(batch, lengths)):
        input_ids[b, :n] = item["input_ids"]
        labels[b, :n] = item["labels"]
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------
# Answers.
# --------------------------------------------------------------------------------------

_ANSWER_MARK = re.compile(r"The answer is:?", re.IGNORECASE)
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_ANSWER_VALUE = re.compile(
    rf"\s*\\?\$?\s*(?P<sign>[-−])?\s*\\?\$?\s*"
    rf"(?:\\[dt]?frac\{{(?P<fnum>{_NUMBER})\}}\{{(?P<fden>{_NUMBER})\}}"
    rf"|(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?)(?!\w)"
)


def extract_answer(text: str) -> float | None:
    """The number that starts the text after the last ``"The answer is:"``, or ``None``.

    Accepts ``1,234``, ``-5``, ``2.5``, ``3/4``, ``\\frac{3}{4}``, a leading ``$`` and a
    trailing period or unit word; text that does not start with a number (``x = 3``,
    ``5x``, ``\\sqrt{2}``) gives ``None``.
    """
    marks = list(_ANSWER_MARK.finditer(text))
    if not marks:
        return None
    m = _ANSWER_VALUE.match(text, marks[-1].end())
    if m is None:
        return None
    num = m["num"] or m["fnum"]
    den = m["den"] or m["fden"]
    value = float(num.replace(",", ""))
    if den is not None:
        d = float(den.replace(",", ""))
        if d == 0:
            return None
        value /= d
    return -value if m["sign"] else value


def answers_match(pred: str, ref: str, tol: float = 1e-6) -> bool:
    """Whether both texts hold answers within ``tol * max(1, |ref|)`` of each other."""
    a, b = extract_answer(pred), extract_answer(ref)
    if a is None or b is None:
        return False
    return abs(a - b) <= tol * max(1.0, abs(b))
