"""Tokenizer, chat template, streaming detokenizer and stop-string matcher built on `tokenizers` alone."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from tokenizers import Tokenizer

from ..errors import InputError

_CHATML_EOS = ("<|im_end|>", "<|endoftext|>")
_REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
# Texts this long are encoded through encode_batch, which releases the GIL (encode holds it throughout:
# a 7 MiB prompt stalled every other thread, the server's event loop included, for seconds).
_RELEASE_GIL_CHARS = 8192
# NFC composes at most a few code points into one (e.g. U+0391 U+0313 U+0342 U+0345 -> U+1F8F).
_NORMALIZER_SHRINK = 4


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as plain strings or AddedToken dicts.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Non-ASCII must survive unescaped, or tool schemas in prompts differ from what the model was trained on.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class BundleTokenizer:
    """A `tokenizer.json` plus the chat template and special tokens from `tokenizer_config.json`."""

    def __init__(self, tokenizer: Tokenizer, config: Mapping[str, Any] | None = None) -> None:
        self._tok = tokenizer
        config = dict(config or {})
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.chat_template = _pick_template(config.get("chat_template"))
        self._compiled: Any = None
        self._bytes: _TokenBytes | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> BundleTokenizer:
        """Load DIR/tokenizer.json and, when present, DIR/tokenizer_config.json."""
        root = Path(path)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise InputError(f"{tok_path} is missing: pass a directory holding the tokenizer.json saved with the model")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses from Rust
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{tok_path} could not be read ({first}): restore the original tokenizer.json") from None
        cfg_path = root / "tokenizer_config.json"
        return cls(tokenizer, read_json_object(cfg_path) if cfg_path.is_file() else {})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for text; special-token strings in text are matched as single tokens. Text that is
        not valid Unicode (a lone UTF-16 surrogate) is an InputError."""
        try:
            if len(text) < _RELEASE_GIL_CHARS:
                return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
            return list(self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        except TypeError:  # the Rust side takes only valid Unicode
            bad = _SURROGATE.search(text) if isinstance(text, str) else None
            if bad is None:
                raise
            raise InputError(f"the {{opt:prompt}} holds a lone UTF-16 surrogate (U+{ord(bad.group()):04X}) at "
                             f"character {bad.start()}, which is not valid Unicode: send valid UTF-8 text") from None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of input text one token can stand for: the longest vocabulary entry (a
        byte-level entry spells one character per byte, and a character is at least one byte), times what a
        normalizer may compose into one character. Computed once (a pass over the vocabulary)."""
        longest = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return longest * (_NORMALIZER_SHRINK if self._tok.normalizer is not None else 1)

    def max_text_chars(self, tokens: int) -> int:
        """No text longer than this encodes to `tokens` tokens or fewer: a size check that needs no encoding."""
        return tokens * self.max_token_chars

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ids; invalid UTF-8 becomes U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of an exact vocabulary entry, or None."""
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer.json content (what llguidance builds its token trie from)."""
        return self._tok.to_str()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token may hold part of a UTF-8 character, which
        `decode` would turn into U+FFFD)."""
        if self._bytes is None:
            self._bytes = _TokenBytes(self._tok)
        return self._bytes(int(token_id))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the configured eos plus the ChatML terminators the vocab has."""
        ids: list[int] = []
        for token in (self.eos_token, *_CHATML_EOS):
            tid = self.token_to_id(token) if token else None
            if tid is not None and tid not in ids:
                ids.append(tid)
        return tuple(ids)

    @property
    def pad_token_id(self) -> int | None:
        """Configured pad id; else the first eos id, the usual stand-in; else None."""
        tid = self.token_to_id(self.pad_token) if self.pad_token else None
        if tid is not None:
            return tid
        eos = self.eos_token_ids
        return eos[0] if eos else None

    @property
    def vocab_size(self) -> int:
        """Tokenizer vocabulary including added tokens (the model's embedding table may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def same_vocabulary(self, other: "BundleTokenizer") -> bool:
        """Whether both map every token (added ones included) to the same id."""
        return self._tok.get_vocab(with_added_tokens=True) == other._tok.get_vocab(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        """Whether tokenizer_config.json supplied a chat template."""
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render messages (and tool definitions, for templates that use them) with the bundle's Jinja chat
        template, as transformers does."""
        if self.chat_template is None:
            raise InputError(
                "this tokenizer has no chat template: drop {opt:chat} or add a chat_template to tokenizer_config.json"
            )
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts: fix the chat input")
        from jinja2.exceptions import TemplateError

        try:
            return self._template().render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise InputError(f"chat template failed ({exc}): fix the messages or the chat_template") from None

    def chat_prompt(self, user_text: str, system: str | None = None) -> str:
        """One-turn prompt: optional system message, the user text, then the assistant header."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": user_text})
        return self.apply_chat_template(messages, add_generation_prompt=True)

    def _template(self) -> Any:
        if self._compiled is None:
            # Imported lazily: plain completion on a device should not pay for jinja2.
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            try:
                self._compiled = env.from_string(self.chat_template)
            except TemplateError as exc:
                raise InputError(f"chat_template does not compile ({exc}): fix it in tokenizer_config.json") from None
        return self._compiled


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a tokenizer or generation config file; InputError for anything else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}): restore the original file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object: restore the original file")
    return data


def read_generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json ({} when absent), its eos_token_id checked: a token id or a list of them."""
    if not Path(path).is_file():
        return {}
    cfg = read_json_object(path)
    eos = cfg.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if any(type(i) is not int or i < 0 for i in ids):
        raise InputError(f"{path} has eos_token_id {eos!r}, which is not a token id or a list of them: restore the "
                         "original file")
    return cfg


def check_tokenizer_files(root: str | Path) -> BundleTokenizer:
    """Load and check every tokenizer file a bundle carries (tokenizer.json, tokenizer_config.json and its
    chat template, generation_config.json, special_tokens_map.json), so a bad one is refused at export
    rather than copied into the bundle."""
    root = Path(root)
    tok = BundleTokenizer.from_dir(root)
    if tok.has_chat_template:
        tok._template()  # compiles, or InputError
    read_generation_config(root / "generation_config.json")
    if (root / "special_tokens_map.json").is_file():
        read_json_object(root / "special_tokens_map.json")
    return tok


def _pick_template(value: Any) -> str | None:
    # Newer configs may store several named templates; the unnamed chat path uses "default".
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


class _TokenBytes:
    """Token id -> bytes: GPT-2 byte-level vocabularies map each character back to its byte; `<0xNN>`
    byte-fallback tokens are that byte; anything else (added tokens, other models) is its UTF-8 text."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._special = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        decoder = json.loads(tok.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder]) if isinstance(d, Mapping)}
        self._byte_level = _byte_alphabet() if "ByteLevel" in kinds else None
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        out = self._cache.get(token_id)
        if out is None:
            out = self._cache[token_id] = self._bytes(token_id)
        return out

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return self._special[token_id].encode("utf-8")
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(0x100 + extra)] = b
            extra += 1
    return out


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class StreamDecoder:
    """Incremental detokenizer: emits text as soon as it is complete UTF-8.

    Only a short window is re-decoded per token: ids from `_prefix` (the start of the last emitted
    piece, kept so decoders that depend on left context stay right) to the end.
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window only; older ids are dropped
        self._read = 0  # index in _ids up to which text has been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text, "" while a character is still partial."""
        self._ids.append(int(token_id))
        prefix = self._tok.decode(self._ids[: self._read], skip_special_tokens=self._skip)
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return ""
        # The emitted piece becomes the next window's left context.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Return whatever is held back (a dangling partial character decodes as U+FFFD)."""
        prefix = self._tok.decode(self._ids[: self._read], skip_special_tokens=self._skip)
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        self._ids, self._read = [], 0
        return text[len(prefix) :]


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back tails that may start one."""

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self._stops = tuple(stop_strings)
        if any(not isinstance(s, str) or not s for s in self._stops):
            raise InputError(
                f"stop strings must be non-empty strings, got {self._stops!r}: remove the empty stop value"
            )
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been seen."""
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was hit); after a hit, always ("", True)."""
        if self._stopped:
            return "", True
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held, self._stopped = "", True
            return buf[: min(hits)], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Return held-back text once generation ends without a stop."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _partial_tail(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        longest = min(len(buf), max((len(s) for s in self._stops), default=1) - 1)
        for k in range(longest, 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
