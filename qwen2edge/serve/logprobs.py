"""OpenAI's `logprobs` objects from the runtime's TokenLogprob records.

Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`; `top_logprobs` maps token text to
log-probability for the `logprobs` best tokens plus the chosen one (so up to logprobs + 1 entries, as
OpenAI documents). Chat: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`. A token that is
not valid UTF-8 on its own (part of a character) is written `bytes:\\xe2\\x80` as OpenAI does;
`text_offset` counts characters, so such a token advances it by the characters it completes.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..runtime.logits import TokenLogprob
from ..runtime.tokenizer import BundleTokenizer

FLOOR = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens at this value


def token_text(tokenizer: BundleTokenizer, token: int) -> str:
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _lp(value: float) -> float:
    return max(value, FLOOR)


class CompletionLogprobs:
    """Builds completions `logprobs`, in pieces for a stream (each `add` returns its own fragment) and
    whole (`value`)."""

    def __init__(self, tokenizer: BundleTokenizer, offset: int = 0):
        self.tok = tokenizer
        self.offset = offset  # characters of text before the next token
        self.total: dict[str, list[Any]] = _empty()

    def add(self, ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[str, list[Any]]:
        """Tokens `ids` with their records (None where nothing predicts the token: a prompt's first)."""
        part = _empty()
        for tid, entry in zip(ids, entries):
            text = token_text(self.tok, tid)
            part["tokens"].append(text)
            part["text_offset"].append(self.offset)
            self.offset += sum(1 for b in self.tok.token_bytes(tid) if b & 0xC0 != 0x80)
            if entry is None:
                part["token_logprobs"].append(None)
                part["top_logprobs"].append(None)
                continue
            part["token_logprobs"].append(_lp(entry.logprob))
            top = {token_text(self.tok, t): _lp(lp) for t, lp in entry.top}
            top.setdefault(text, _lp(entry.logprob))
            part["top_logprobs"].append(top)
        for key, values in part.items():
            self.total[key] += values
        return part

    @property
    def value(self) -> dict[str, list[Any]]:
        return self.total


def _empty() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def chat_content(tokenizer: BundleTokenizer, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat `logprobs.content` entries for generated tokens."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": _lp(logprob),
                "bytes": list(tokenizer.token_bytes(token))}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
