"""Constrained decoding: a grammar (JSON schema, regex, choice list, Lark) masks each step's logits.

The grammar engine is llguidance (the one llama.cpp, vLLM and onnxruntime-genai use): Rust, no torch, a
token trie built once per tokenizer from `tokenizer.json` alone, and a per-step mask in microseconds. It
is imported lazily, so plain generation never needs it (`pip install llguidance`, in the `serve` extra).

JSON is generated compact-ish, as `json.dumps` writes it (", " and ": " separators, no other
whitespace): free whitespace lets a weak model pad forever instead of closing the object. A schema's own
`x-guidance` options override that.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InferenceError, InputError

_EXCERPT = re.compile(r"^\s*(\d+ \|.*|\^+)\s*$")
KINDS = ("json_schema", "regex", "choice", "lark")
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """What a row's output must match. `kind` is one of KINDS; `source` the schema (JSON text), regex,
    choices (JSON list of strings) or grammar (Lark, or llama.cpp's GBNF); `option` names the setting it
    came from, for errors."""

    kind: str
    source: str
    option: str = "grammar"

    @classmethod
    def json_schema(cls, schema: Any, option: str = "response_format") -> "Grammar":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema), option)

    def llguidance(self) -> str:
        """The grammar in llguidance's own form (raises InputError for malformed sources)."""
        from llguidance import LLMatcher

        if self.kind not in KINDS:
            raise InputError(f"unknown grammar kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.kind == "json_schema":
            try:
                return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_STYLE)
            except ValueError as exc:
                raise InputError(f"{{opt:{self.option}}} holds no valid JSON schema ({_one_line(exc)}): send a JSON "
                                 "object") from None
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            choices = json.loads(self.source)
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        from llguidance import grammar_from

        try:  # Lark, or llama.cpp's GBNF (converted to Lark)
            return grammar_from("grammar", self.source)
        except ValueError as exc:
            raise InputError(f"{{opt:{self.option}}} is neither Lark nor GBNF ({_one_line(exc)}): fix the "
                             "grammar") from None


def _one_line(text: object) -> str:
    """llguidance's message on one line, without the source excerpt and caret lines it appends."""
    lines = [ln for ln in str(text).splitlines() if not _EXCERPT.match(ln)]
    return " ".join(" ".join(lines).split())


def engine_available() -> bool:
    """Whether llguidance is installed (importing it: it is only asked once a grammar is)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def check(grammar: Grammar) -> None:
    """Compile `grammar` without a tokenizer; raise InputError naming the problem (unsupported schema
    keywords, regex syntax, unknown Lark rules) in the terms of the option that set it."""
    _require_engine(grammar.option)
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar.llguidance())
    if is_error:
        raise InputError(f"{{opt:{grammar.option}}} cannot be enforced: {_one_line(messages[0])}: fix it or drop "
                         "the unsupported feature")


def _require_engine(option: str) -> None:
    if not engine_available():
        raise InputError(f"{{opt:{option}}} needs the llguidance grammar engine: pip install llguidance "
                         "(or install qwen2edge[serve])")


class GrammarEngine:
    """llguidance's view of one tokenizer; makes a `Constraint` per constrained row. Thread-safe."""

    def __init__(self, tokenizer_json: str, stop_ids: Sequence[int]):
        _require_engine("grammar")
        from llguidance import LLTokenizer

        # Built from tokenizer.json alone (no transformers): ~1-2 s for a 150k vocabulary, once.
        self.tokenizer = LLTokenizer(tokenizer_json, eos_token=list(stop_ids) or None)
        self.vocab_size = self.tokenizer.vocab_size
        self._compiled: dict[Grammar, str] = {}
        self._lock = threading.Lock()

    def constraint(self, grammar: Grammar) -> "Constraint":
        """A fresh matcher for one row; InputError if the grammar does not compile for this tokenizer."""
        from llguidance import LLMatcher

        with self._lock:  # repeated grammars (n choices, retries) compile once
            text = self._compiled.get(grammar)
            if text is None:
                text = self._compiled[grammar] = grammar.llguidance()
                if len(self._compiled) > 64:
                    self._compiled.pop(next(iter(self._compiled)))
        matcher = LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise InputError(f"{{opt:{grammar.option}}} cannot be enforced: {_one_line(matcher.get_error())}: fix "
                             "it or drop the unsupported feature")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One row's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Boolean [vocab_size] of the tokens the grammar accepts next (stop ids when it may end)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bits)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size].view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """[1, V] logits with every token the grammar refuses at -inf (a new array). Ids past the
        tokenizer's vocabulary (padding rows of the embedding) are refused too."""
        allowed = self.allowed()
        vocab = logits.shape[-1]
        keep = np.zeros(vocab, dtype=bool)
        n = min(vocab, allowed.size)
        keep[:n] = allowed[:n]
        return np.where(keep, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)

    def consume(self, token: int) -> None:
        """Advance past a sampled token (one the mask allowed)."""
        if not self.matcher.consume_token(int(token)):
            raise InferenceError(f"the grammar refused token {token} it had allowed ({self.matcher.get_error()}): "
                                 "report this as a qwen2edge bug")

    @property
    def done(self) -> bool:
        """The grammar is complete and can take nothing more: the row should end now."""
        return self.matcher.is_stopped()
