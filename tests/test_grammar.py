"""Structured outputs: every text a grammar's masks let through decodes to a valid document.

The walks stand in for a model: at each step they fill the mask, pick an allowed token with a
seeded RNG (leaning towards tokens that close strings and brackets, and towards the stop token,
so that walks end), and stop at the stop token. The decoded text must then pass an independent
check: `json.loads` + `jsonschema.validate`, `re.fullmatch`, or a small parser.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from sgl_compile.errors import SglcError
from sgl_compile.models.loading import open_checkpoint
from sgl_compile.runtime.grammar import (
    MAX_SCHEMA_DEPTH,
    Constraint,
    GrammarBackend,
    allocate_mask,
    apply_mask,
    constraint_spec,
    sampling_fields,
)
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.tokenizer import Tokenizer, byte_tokenizer
from sgl_compile.tokenizer.base import HFBackend

PADDING = 64  # logits columns beyond the tokenizer's vocabulary, as in models that pad lm_head


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf: Path) -> Tokenizer:
    return open_checkpoint(str(smollm2_gguf)).tokenizer


@pytest.fixture(scope="module")
def smol(smol_tokenizer: Tokenizer) -> GrammarBackend:
    return GrammarBackend(smol_tokenizer, smol_tokenizer.vocab_size + PADDING)


class Walker:
    """A seeded stand-in for a model that only ever samples tokens the mask allows."""

    def __init__(self, tokenizer: Tokenizer, backend: GrammarBackend) -> None:
        self.tokenizer, self.backend = tokenizer, backend
        n = backend.vocab_size
        texts = [tokenizer.decode([i], False) if i < tokenizer.vocab_size else "" for i in range(n)]
        self.short = np.array([0 < len(t) <= 2 for t in texts])
        self.closing = np.array([any(c in t for c in '"}])') for t in texts])
        # xgrammar 0.2.8 accepts UTF-8-encoded surrogates (ED A0..BF xx), which decode to U+FFFD; a model
        # trained on valid text does not write them, so the walks leave out the lead byte ED.
        decoded = backend.info.decoded_vocab
        self.usable = np.array([i >= len(decoded) or b"\xed" not in decoded[i] for i in range(n)])
        self.bitmask = allocate_mask(1, n)

    def allowed(self) -> np.ndarray:
        bits = np.unpackbits(self.bitmask[0].numpy().view(np.uint8), bitorder="little")
        return bits[: self.backend.vocab_size].astype(bool)

    def walk(self, kind: str, text: str, seed: int, max_steps: int = 400) -> str:
        rng, c = random.Random(seed), Constraint(self.backend.compile(kind, text))
        ids: list[int] = []
        for _ in range(max_steps):
            c.fill_mask(self.bitmask, 0)
            allowed = self.allowed()
            assert allowed.any(), f"no token allowed after {self.tokenizer.decode(ids)!r}"
            stops = [t for t in self.backend.stop_token_ids if allowed[t]]
            allowed[stops] = False
            allowed &= self.usable
            if stops and (rng.random() < 0.4 or len(ids) > max_steps // 2 or not allowed.any()):
                assert c.accept(stops[0]) and c.is_terminated()
                return self.tokenizer.decode(ids)
            token = self._pick(allowed, rng)
            assert c.accept(token), f"the mask allowed {token} but the matcher refused it"
            ids.append(token)
        raise AssertionError(f"no end after {max_steps} tokens: {self.tokenizer.decode(ids)!r}")

    def _pick(self, allowed: np.ndarray, rng: random.Random) -> int:
        r = rng.random()
        for wanted, p in ((allowed & self.closing, 0.45), (allowed & self.short, 0.85)):
            if r < p and wanted.any():
                return int(rng.choice(np.flatnonzero(wanted)))
        return int(rng.choice(np.flatnonzero(allowed)))


@pytest.fixture(scope="module")
def walker(smol_tokenizer: Tokenizer, smol: GrammarBackend) -> Walker:
    return Walker(smol_tokenizer, smol)


def _obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties), **extra}


SCHEMAS = {
    "person": _obj(
        {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        ["name", "age"],
    ),
    "nested": _obj(
        {
            "user": _obj(
                {
                    "id": {"type": "integer", "minimum": 1},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string", "maxLength": 6},
                        "minItems": 1,
                        "maxItems": 3,
                    },
                }
            ),
            "active": {"type": "boolean"},
        }
    ),
    "enums": _obj(
        {
            "color": {"enum": ["red", "green", "light blue"]},
            "size": {"type": "integer", "enum": [1, 2, 3]},
            "unit": {"const": "cm"},
        }
    ),
    "numbers": _obj(
        {
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "ratio": {"type": "number", "minimum": -1, "maximum": 1},
            "count": {"type": "integer", "minimum": -50, "maximum": 50},
        }
    ),
    "points": {
        "type": "array",
        "items": _obj({"x": {"type": "integer"}, "y": {"type": "integer"}}),
        "minItems": 2,
        "maxItems": 4,
    },
    "any_of": _obj(
        {"value": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "null"}]}}
    ),
    "bool_null": _obj(
        {"flag": {"type": "boolean"}, "nothing": {"type": "null"}, "maybe": {"type": ["boolean", "null"]}}
    ),
    "patterns": _obj(
        {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"},
            "word": {"type": "string", "minLength": 3, "maxLength": 5},
        }
    ),
    "optional": _obj(
        {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 8}, "c": {"type": "boolean"}}, ["b"]
    ),
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 4}, {"type": "integer"}],
        "items": False,
    },
    "recursive": {
        "$defs": {
            "node": _obj(
                {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                ["value"],
            )
        },
        "$ref": "#/$defs/node",
    },
    "unicode": _obj(
        {"city": {"enum": ["Zürich", "東京", "Kraków"]}, "note": {"type": "string", "maxLength": 4}}
    ),
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_walks_give_valid_documents(walker: Walker, name: str) -> None:
    schema = SCHEMAS[name]
    for seed in range(3):
        text = walker.walk("json_schema", json.dumps(schema), seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_walks_give_objects(walker: Walker) -> None:
    for seed in range(3):
        assert isinstance(json.loads(walker.walk("json_object", "", seed)), dict)


REGEXES = [
    r"\d{3}-\d{4}",
    r"(cat|dog|bird)s? (runs|sleeps)",
    r"[a-z]{2,8}@[a-z]{2,5}\.(com|org)",
    r"-?(0|[1-9]\d{0,3})\.\d{2}",
    r"20\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    r"[αβγ]{2} 日本語?",
]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_walks_match(walker: Walker, pattern: str) -> None:
    for seed in range(3):
        text = walker.walk("regex", pattern, seed)
        assert re.fullmatch(pattern, text), (pattern, text)


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9] | [1-9] [0-9]*
"""


def _parse_arithmetic(text: str) -> None:
    """A recursive-descent parser for ARITHMETIC; raises on anything else."""
    pos = 0

    def eat(pattern: str) -> str | None:
        nonlocal pos
        m = re.compile(pattern).match(text, pos)
        if m:
            pos = m.end()
        return m and m.group()

    def expr() -> None:
        term()
        while eat(r"[+-]"):
            term()

    def term() -> None:
        factor()
        while eat(r"[*/]"):
            factor()

    def factor() -> None:
        if eat(r"\("):
            expr()
            assert eat(r"\)"), text
        else:
            assert eat(r"0(?![0-9])|[1-9][0-9]*"), text

    expr()
    assert pos == len(text), text


def test_ebnf_walks_parse(walker: Walker) -> None:
    texts = {walker.walk("ebnf", ARITHMETIC, seed) for seed in range(8)}
    for text in texts:
        _parse_arithmetic(text)
    assert any(len(t) > 3 for t in texts), texts  # the walks get past a lone number


def test_byte_tokenizer_walks(walker: Walker) -> None:
    """Random-weight models use the byte tokenizer (ids 0..255 are bytes); their masks work too."""
    tok = byte_tokenizer(300)
    backend = GrammarBackend(tok, 320)
    bytes_walker = Walker(tok, backend)
    schema = SCHEMAS["unicode"]
    for seed in range(3):
        jsonschema.validate(json.loads(bytes_walker.walk("json_schema", json.dumps(schema), seed)), schema)
        assert re.fullmatch(REGEXES[1], bytes_walker.walk("regex", REGEXES[1], seed))


def _byte_fallback_tokenizer() -> Tokenizer:
    """A Llama-2-style tokenizer.json: "▁" for spaces, "<0xNN>" byte pieces, a prepended space."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁a", "at", "▁c", "▁cat"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("a", "t"), ("▁", "c"), ("▁c", "at")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(HFBackend(tok), 1, (2,))


def _sentencepiece_tokenizer(directory: Path) -> Tokenizer:
    """A tokenizer.model checkpoint: a small sentencepiece model trained here (as in test_tokenizer)."""
    import sentencepiece as spm

    from sgl_compile.tokenizer.base import SentencePieceBackend
    from tests import prompts

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(prompts.LONG.split(". ") * 4 + prompts.CORPUS), model_prefix=str(directory / "sp"),
        vocab_size=500, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )  # fmt: skip
    backend = SentencePieceBackend(str(directory / "sp.model"), add_bos=True)
    return Tokenizer(backend, backend.sp.bos_id(), (backend.sp.eos_id(),))


@pytest.mark.parametrize("kind", ["tokenizer.json", "tokenizer.model"])
def test_byte_fallback_tokenizers_walk(kind: str, tmp_path: Path) -> None:
    """Llama-2-style vocabularies ("▁" spaces, "<0xNN>" bytes, a prepended space) from both backends."""
    tok = _byte_fallback_tokenizer() if kind == "tokenizer.json" else _sentencepiece_tokenizer(tmp_path)
    assert tok.decode(tok.encode("the cat 日本")) == "the cat 日本"
    backend = GrammarBackend(tok, tok.vocab_size + 3)
    assert backend.info.vocab_type.name == "BYTE_FALLBACK" and backend.info.add_prefix_space
    walker = Walker(tok, backend)
    # (not a pattern that starts with a space: decoding output ids on their own drops a leading "▁")
    for pattern in [r"(the|a) (cat|hat)s?\n", r"[a-c]{1,3} 日本", r"x[yz]"]:
        for seed in range(3):
            text = walker.walk("regex", pattern, seed)
            assert re.fullmatch(pattern, text), (pattern, text)
    schema = SCHEMAS["unicode"]
    jsonschema.validate(json.loads(walker.walk("json_schema", json.dumps(schema), 0)), schema)


def test_smollm2_vocabulary_is_byte_level(smol: GrammarBackend, smol_tokenizer: Tokenizer) -> None:
    assert smol.info.vocab_type.name == "BYTE_LEVEL" and not smol.info.add_prefix_space
    assert smol.stop_token_ids == list(smol_tokenizer.eos_token_ids)
    decoded = smol.info.decoded_vocab
    ids = smol_tokenizer.encode(' {"a": "Zürich\n"}', False)
    assert b"".join(decoded[i] for i in ids).decode() == smol_tokenizer.decode(ids)


def test_masks_exclude_padding_and_special_tokens(smol: GrammarBackend, smol_tokenizer: Tokenizer) -> None:
    """Inside a string any text is allowed, but never a special token (decoding would drop it) nor a
    padded id; rows not asked for are left alone; columns beyond the bitmask are masked."""
    c = Constraint(smol.compile("regex", '"[^"]*"'))
    assert c.accept_string('"')
    n = smol.vocab_size
    bitmask = allocate_mask(3, n)
    assert c.fill_mask(bitmask, 1)
    logits = torch.zeros(3, n + 7)
    apply_mask(logits, bitmask, rows=[1])
    allowed = set(torch.nonzero(logits[1] == 0).flatten().tolist())
    assert len(allowed) > 40000 and max(allowed) < smol_tokenizer.vocab_size
    special = smol_tokenizer.encode("<|im_start|><|endoftext|><|im_end|>", False)
    assert len(special) == 3 and not allowed & set(special)
    assert torch.all(logits[0] == 0) and torch.all(logits[2] == 0)
    half = torch.zeros(3, n, dtype=torch.bfloat16)
    apply_mask(half, bitmask)
    assert torch.equal(half[1] == 0, logits[1, :n] == 0)


def test_stop_token_only_when_complete_and_after(smol: GrammarBackend, smol_tokenizer: Tokenizer) -> None:
    c, (eos,) = Constraint(smol.compile("regex", r"ab?")), smol.stop_token_ids
    bitmask = allocate_mask(1, smol.vocab_size)
    c.fill_mask(bitmask, 0)
    assert not _bit(bitmask, eos) and not c.accept(eos)
    assert c.accept_string("a") and c.is_completed() and not c.is_terminated()
    c.fill_mask(bitmask, 0)
    assert _bit(bitmask, eos)
    assert c.accept(eos) and c.is_terminated()
    c.fill_mask(bitmask, 0)  # terminated: only the stop token
    assert [t for t in range(smol.vocab_size) if _bit(bitmask, t)] == [eos]
    assert c.jump_forward() == ""
    c.rollback(1)
    assert not c.is_terminated() and c.accept_string("b")
    c.release()
    with pytest.raises(RuntimeError):
        c.accept(eos)


def _bit(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def test_jump_forward_and_retokenize(smol: GrammarBackend, smol_tokenizer: Tokenizer) -> None:
    schema = _obj({"name": {"type": "string"}, "kind": {"enum": ["cat"]}})
    c = Constraint(smol.compile("json_schema", json.dumps(schema)))
    forced = c.jump_forward()
    assert forced == '{"name": "'
    old = smol_tokenizer.encode('{"na', False)
    assert all(c.accept(t) for t in old)
    new = smol_tokenizer.encode(forced, False)
    assert c.retokenize(old, new) and c.jump_forward() == ""
    assert all(c.accept(t) for t in smol_tokenizer.encode('Tom"', False))
    assert c.jump_forward() == ', "kind": "cat"}'
    assert not c.retokenize([], smol_tokenizer.encode("nope", False))


def test_compile_is_cached_and_lru(smol_tokenizer: Tokenizer) -> None:
    backend = GrammarBackend(smol_tokenizer, smol_tokenizer.vocab_size, cache_size=2)
    a = backend.compile("regex", "a+")
    assert backend.compile("regex", "a+") is a
    assert backend.compile("json_object", "ignored") is backend.compile("json_object", "")
    backend.compile("regex", "b+")
    backend.compile("regex", "c+")  # evicts the least recently used: a+ (json_object was used after)
    assert backend.compile("regex", "a+") is not a


@pytest.mark.parametrize(
    "kind,text,message",
    [
        ("json_schema", "{not json", "not JSON"),
        ("json_schema", "[1, 2]", "an object or a boolean"),
        ("json_schema", '{"type": "nonsense"}', 'Unsupported type "nonsense"'),
        ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}', "minimum greater than maximum"),
        ("json_schema", '{"$ref": "#/$defs/missing"}', "missing"),
        ("json_schema", '{"items": ' * MAX_SCHEMA_DEPTH + "{}" + "}" * MAX_SCHEMA_DEPTH, "nested deeper"),
        ("regex", "(abc", "parenthesis is not closed"),
        ("regex", r"(a)\1", "Backreference"),
        ("regex", "[z-a]", "lower bound is larger"),
        ("ebnf", "root ::= undefined", 'Rule "undefined" is not defined'),
        ("ebnf", 'start ::= "a"', '"root" is not found'),
        ("xml", "<a/>", "unknown constraint kind"),
    ],
)
def test_invalid_constraints_raise_with_the_compilers_message(
    smol: GrammarBackend, kind: str, text: str, message: str
) -> None:
    with pytest.raises(SglcError, match=re.escape(message)) as e:
        smol.compile(kind, text)
    assert not re.search(r"\.cc:\d+", str(e.value)), "the C++ log prefix is stripped"


def test_constraint_spec_from_request_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert constraint_spec() is None
    assert constraint_spec(regex="a+") == ("regex", "a+")
    assert constraint_spec(ebnf='root ::= "x"') == ("ebnf", 'root ::= "x"')
    assert constraint_spec(json_schema='{"type": "string"}') == ("json_schema", '{"type": "string"}')
    assert constraint_spec(response_format={"type": "text"}) is None
    assert constraint_spec(response_format={"type": "json_object"}) == ("json_object", "")
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert constraint_spec(response_format=fmt) == ("json_schema", json.dumps(schema))
    with pytest.raises(SglcError, match="schema is required"):
        constraint_spec(response_format={"type": "json_schema", "json_schema": {"name": "thing"}})
    with pytest.raises(SglcError, match="at most one"):
        constraint_spec(regex="a", response_format={"type": "json_object"})
    with pytest.raises(SglcError, match="at most one"):
        constraint_spec(regex="a", ebnf='root ::= "a"')
    assert sampling_fields(("json_object", "")) == {"json_schema": '{"type": "object"}'}
    assert sampling_fields(("regex", "a+")) == {"regex": "a+"} and sampling_fields(None) == {}


def test_sampling_params_carry_one_constraint() -> None:
    assert SamplingParams().constraint is None
    assert SamplingParams.from_dict({"regex": "a+"}).constraint == ("regex", "a+")
    assert SamplingParams.from_dict({"json_schema": {"type": "object"}}).constraint == (
        "json_schema",
        '{"type": "object"}',
    )
    with pytest.raises(SglcError, match="at most one"):
        SamplingParams.from_dict({"regex": "a+", "ebnf": 'root ::= "a"'})
    with pytest.raises(SglcError, match="must be strings"):
        SamplingParams(regex=3)  # type: ignore[arg-type]


def test_json_masks_never_allow_raw_control_characters(
    smol: GrammarBackend, smol_tokenizer: Tokenizer
) -> None:
    """xgrammar lets length-bounded strings hold raw control characters (mlc-ai/xgrammar#800); our JSON
    masks drop those tokens, so the output stays JSON that strict parsers read."""
    bell = smol_tokenizer.encode("\x07", False)
    assert len(bell) == 1
    schema = {"type": "string", "maxLength": 5}
    c = Constraint(smol.compile("json_schema", json.dumps(schema)))
    assert c.accept_string('"a')
    bitmask = allocate_mask(1, smol.vocab_size)
    c.fill_mask(bitmask, 0)
    assert not _bit(bitmask, bell[0]) and not c.accept(bell[0])
    assert c.accept(smol_tokenizer.encode("b", False)[0])
    regex = Constraint(smol.compile("regex", r"a[\x01-\x1f]"))  # other kinds keep every token
    assert regex.accept_string("a") and regex.accept(bell[0])
