"""Arguments of the decoding API checked at every entry point (``mtpkern.generate`` with one
prompt and with a batch, ``Decoder``, ``BatchDecoder``, ``load_model``, ``mtpkern generate``):
each bad one is a one-line ValueError or TypeError that names it, never a raw Python or torch
message, and never accepted to give a silently wrong answer (issue 22 items 13 and 14)."""

import pytest
import torch

from _tiny import VOCAB, save_random_medusa
from mtpkern import BatchDecoder, Decoder, generate, load_model
from mtpkern.cli import main
from mtpkern.config import GPT2Config
from mtpkern.models import GPT2


def _entry_points(model, **kw):
    """Every way to decode: name -> a call taking the prompt(s) and generate()'s keywords."""
    args = dict(max_new_tokens=4, **kw)
    return {
        "generate": lambda ids, **k: generate(model, ids, strategy="medusa", **args, **k),
        "generate-batch": lambda ids, **k: generate(model, [ids, ids], strategy="medusa", **args, **k),
        "Decoder": lambda ids, **k: Decoder(model, "medusa", tree=k.pop("tree", None)).generate(ids, **args, **k),
        "BatchDecoder": lambda ids, **k: BatchDecoder(model, "medusa", tree=k.pop("tree", None)).generate(
            [ids], **args, **k),
    }


def _one_line_error(call, kind, *fragments):
    with pytest.raises(kind) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


@pytest.mark.parametrize("eos, kind", [(-1, ValueError), (VOCAB, ValueError), (10**9, ValueError),
                                       (1.0, TypeError), (True, TypeError), ("63", TypeError)])
def test_an_eos_id_that_can_never_stop_generation_is_refused(medusa_model, eos, kind):
    """Item 14: -1, vocab_size or 1.0 were accepted, and the output ran to max_new_tokens."""
    for name, call in _entry_points(medusa_model).items():
        _one_line_error(lambda: call([1, 2, 3], eos_token_id=eos), kind, "eos_token_id")


def test_an_eos_id_in_the_vocabulary_stops_generation(medusa_model):
    for name, call in _entry_points(medusa_model).items():
        for eos in (VOCAB - 1, torch.tensor(VOCAB - 1)):  # an int, or a 0-d integer tensor
            out = call([1, 2, 3], eos_token_id=eos)
            assert isinstance(out, list) == (name in ("generate-batch", "BatchDecoder")), name


@pytest.mark.parametrize("prompt", ["hello", b"hello", ["hello", "world"]])
def test_text_where_token_ids_belong_says_to_tokenize_first(medusa_model, prompt):
    """Item 13: generate(model, "hello") read "new(): invalid data type 'str'"."""
    for name, call in _entry_points(medusa_model).items():
        _one_line_error(lambda: call(prompt), TypeError, "input_ids", "tokenize", "load_tokenizer")


@pytest.mark.parametrize("prompt", [None, {"a": 1}, [[1, 2], [3]]])
def test_input_ids_that_are_not_token_ids_are_named(medusa_model, prompt):
    with pytest.raises(TypeError) as info:
        Decoder(medusa_model, "medusa").generate(prompt, max_new_tokens=4)
    assert "input_ids must be token ids" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("tree", [object(), 3, 2.5, torch.tensor([[0]])])
def test_a_tree_of_the_wrong_kind_says_what_a_tree_may_be(medusa_model, tree):
    """Item 13: tree=object() and tree=3 read "'int' object is not iterable"."""
    for name, call in _entry_points(medusa_model).items():
        _one_line_error(lambda: call([1, 2, 3], tree=tree), TypeError, "tree must be a Tree", "chain:3")


@pytest.mark.parametrize("spec", ["", "   "])
def test_an_empty_tree_spec_is_refused(medusa_model, spec):
    for name, call in _entry_points(medusa_model).items():
        _one_line_error(lambda: call([1, 2, 3], tree=spec), ValueError, "tree spec is empty")


class _MetaGenerator(torch.Generator):
    """A generator that says it lives on the meta device (torch refuses to make a real one on
    a machine without an accelerator other than the CPU)."""

    @property
    def device(self):
        return torch.device("meta")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_generator_on_another_device_than_the_models_is_refused(medusa_model, temperature):
    """Item 13: the batch path drew its seeds on the generator's device and failed in torch."""
    for ids in ([1, 2, 3], [[1, 2, 3], [4, 5]]):
        _one_line_error(lambda: generate(medusa_model, ids, max_new_tokens=4, temperature=temperature,
                                         generator=_MetaGenerator()),
                        ValueError, "the generator is on meta but the model is on cpu")
        _one_line_error(lambda: generate(medusa_model, ids, max_new_tokens=4, temperature=temperature, generator=7),
                        TypeError, "generator must be a torch.Generator, got int")


def test_batch_generators_of_the_wrong_kind_are_named(medusa_model):
    dec = BatchDecoder(medusa_model, temperature=1.0)
    _one_line_error(lambda: dec.generate([[1, 2]], max_new_tokens=4, generator=5), TypeError,
                    "generator must be a torch.Generator (the rows' streams are seeded from it) or a list")
    _one_line_error(lambda: dec.generate([[1, 2]], max_new_tokens=4, generator=[_MetaGenerator()]), ValueError,
                    "generator 0: the generator is on meta but the model is on cpu")


def test_a_mask_beside_prompts_of_different_lengths_says_what_it_goes_with(medusa_model):
    """Item 13: BatchDecoder.generate([a, b], attention_mask=m) read "expected sequence of
    length 3 at dim 1 (got 2)". A mask goes with a padded [B, T] batch; a list of prompts of
    any lengths needs none (and a list of equal lengths with its mask works as a tensor)."""
    dec = BatchDecoder(medusa_model, "medusa", max_batch=2)
    for call in (lambda m: dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, attention_mask=m),
                 lambda m: generate(medusa_model, [[1, 2, 3], [4, 5]], max_new_tokens=4, attention_mask=m)):
        _one_line_error(lambda: call(torch.ones(2, 3)), ValueError, "attention_mask goes with a padded [B, T]",
                        "prompts of different lengths need no attention_mask")
    padded = dec.generate([[1, 2, 3], [0, 4, 5]], max_new_tokens=4, attention_mask=[[1, 1, 1], [0, 1, 1]])
    alone = dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
    assert [r.tokens for r in padded] == [r.tokens for r in alone]


def test_a_mask_is_checked_before_a_cache_is_sized_by_it(medusa_model):
    """Item 11's kind: generate() sized the batch's cache by the mask's first dimension before
    checking it, so a [T] mask of a billion (a view: no memory) asked the allocator for a
    cache of a billion rows."""
    huge = torch.ones(1, dtype=torch.long).expand(10**9)
    _one_line_error(lambda: generate(medusa_model, [1, 2, 3], max_new_tokens=4, attention_mask=huge), ValueError,
                    "input_ids with an attention_mask must be [B, T]")


# ----------------------------------------------------------------------------- load_model's dtype


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2") / "checkpoint"
    torch.manual_seed(0)
    GPT2(GPT2Config.tiny(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(d)
    return d


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                         ("float16", torch.float16), ("fp32", torch.float32),
                                         (torch.float16, torch.float16), (torch.float64, torch.float64),
                                         (None, torch.float32)])
def test_load_model_takes_a_dtype_by_name_as_the_cli_does(saved_gpt2, name, dtype):
    """Item 13: dtype="bfloat16" read a raw torch error."""
    assert load_model(saved_gpt2, dtype=name).dtype == dtype


@pytest.mark.parametrize("name", ["bfloat17", "int8", torch.int64, 16])
def test_load_model_refuses_an_unknown_dtype_by_name(saved_gpt2, name):
    _one_line_error(lambda: load_model(saved_gpt2, dtype=name), ValueError, "dtype", "expected one of float32")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    return save_random_medusa(tmp_path_factory.mktemp("cli") / "checkpoint")


def test_cli_generate_refuses_an_empty_tree_spec(cli_checkpoint, capsys):
    args = ["generate", str(cli_checkpoint), "--prompt", "Tom", "--raw", "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*args, "--tree", "chain:2"]) == 0  # the command itself works
    capsys.readouterr()
    code = main([*args, "--tree", ""])
    err = capsys.readouterr().err
    assert code == 2 and "tree spec" in err and len(err.strip().splitlines()) == 1



@pytest.mark.parametrize("kw, error, match", [
    (dict(cuda_graph="no"), TypeError, "cuda_graph must be True or False, got 'no'"),
    (dict(temperature=True), ValueError, "temperature must be a finite number >= 0, got True"),
    (dict(temperature=1.0, top_p=True), ValueError, "top_p must be in (0, 1], got True"),
])
def test_switches_of_the_wrong_kind_are_named(medusa_model, kw, error, match):
    """A truthy string read as cuda_graph=True ("needs a CUDA device"), a bool as a temperature."""
    for make in (lambda: Decoder(medusa_model, "ntp", **kw), lambda: BatchDecoder(medusa_model, "ntp", **kw)):
        _one_line_error(make, error, match)
