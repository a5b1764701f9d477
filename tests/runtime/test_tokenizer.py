"""BundleTokenizer, StreamDecoder and StopMatcher against the real Qwen2 tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from qwen2edge.errors import InputError, cli_spelling
from qwen2edge.runtime.tokenizer import BundleTokenizer, StopMatcher, StreamDecoder

REPO_ROOT = Path(__file__).resolve().parents[2]
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir: Path) -> BundleTokenizer:
    return BundleTokenizer.from_dir(qwen_tokenizer_dir)


def bundle_with(tmp_path: Path, qwen_tokenizer_dir: Path, config: dict | None) -> Path:
    """A directory with Qwen's tokenizer.json and the given tokenizer_config.json (or none)."""
    (tmp_path / "tokenizer.json").symlink_to(qwen_tokenizer_dir / "tokenizer.json")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


# --- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "通义千问是阿里巴巴开发的大语言模型。",
        "Party 🎉🦙 time 👨‍👩‍👧‍👦!",
        "def f(x: int) -> int:\n\treturn x ** 2  # square\n",
        "  leading and trailing spaces  ",
    ],
)
def test_round_trip(tok: BundleTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_known_ids(tok: BundleTokenizer) -> None:
    assert tok.encode("Hello") == [9707]
    assert tok.encode("<|im_start|>user") == [IM_START, 872]


def test_special_tokens(tok: BundleTokenizer) -> None:
    assert tok.token_to_id("<|im_start|>") == IM_START
    assert tok.token_to_id("<|im_end|>") == IM_END
    assert tok.token_to_id("<|endoftext|>") == ENDOFTEXT
    assert tok.token_to_id("<|no_such_token|>") is None
    assert tok.vocab_size == 151646
    assert tok.eos_token_ids == (ENDOFTEXT, IM_END)
    assert tok.pad_token_id == ENDOFTEXT


def test_decode_skips_special_tokens_by_default(tok: BundleTokenizer) -> None:
    ids = [IM_START, 9707, IM_END]
    assert tok.decode(ids) == "Hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"


# --- chat template ---------------------------------------------------------------------------


def test_chatml_template_renders_exactly(tok: BundleTokenizer) -> None:
    assert tok.has_chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_chat_prompt_with_system(tok: BundleTokenizer) -> None:
    assert tok.chat_prompt("Hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_missing_template_says_how_to_fix(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    bare = BundleTokenizer.from_dir(bundle_with(tmp_path, qwen_tokenizer_dir, None))
    assert not bare.has_chat_template
    # Without a config the ChatML terminators still stop generation.
    assert bare.eos_token_ids == (IM_END, ENDOFTEXT)
    with pytest.raises(InputError) as info:
        bare.chat_prompt("Hi")
    assert "drop --chat or add a chat_template to tokenizer_config.json" in info.value.render(cli_spelling)


def test_template_environment_matches_transformers(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    template = (
        "{{ bos_token }}\n"
        "  {% for m in messages %}\n"
        "{{ m | tojson }}|{{ m | tojson(indent=1) | length > 30 }}\n"
        "  {% endfor %}\n"
        "{% if add_generation_prompt %}GO{{ eos_token }}{% endif %}"
    )
    config = {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": {"content": "<|im_end|>"}}
    custom = BundleTokenizer.from_dir(bundle_with(tmp_path, qwen_tokenizer_dir, config))
    # trim_blocks drops the newline after a tag, lstrip_blocks the indent before it; tojson keeps non-ASCII.
    assert custom.apply_chat_template([{"role": "user", "content": "你好"}]) == (
        '<s>\n{"role": "user", "content": "你好"}|True\nGO<|im_end|>'
    )
    assert custom.eos_token_ids == (IM_END, ENDOFTEXT)


def test_named_template_list_uses_default(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    assert BundleTokenizer.from_dir(bundle_with(tmp_path, qwen_tokenizer_dir, config)).chat_prompt("x") == "D"


def test_raise_exception_becomes_input_error(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    config = {"chat_template": template}
    custom = BundleTokenizer.from_dir(bundle_with(tmp_path, qwen_tokenizer_dir, config))
    assert custom.apply_chat_template([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(InputError, match="first must be user") as info:
        custom.apply_chat_template([{"role": "assistant", "content": "a"}])
    assert "\n" not in str(info.value)


def test_template_sandbox_forbids_mutation(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    config = {"chat_template": "{{ messages.append({'role': 'x'}) }}"}
    custom = BundleTokenizer.from_dir(bundle_with(tmp_path, qwen_tokenizer_dir, config))
    messages = [{"role": "user", "content": "a"}]
    with pytest.raises(InputError, match="chat template failed"):
        custom.apply_chat_template(messages)
    assert len(messages) == 1


def test_load_errors(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    with pytest.raises(InputError, match="tokenizer.json is missing"):
        BundleTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="could not be read") as info:
        BundleTokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "good").mkdir()
    good = bundle_with(tmp_path / "good", qwen_tokenizer_dir, None)
    (good / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(InputError, match="tokenizer_config.json is not valid JSON"):
        BundleTokenizer.from_dir(good)


# --- StreamDecoder ---------------------------------------------------------------------------


class RecordingDecoder:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, inner: BundleTokenizer) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(decoder: StreamDecoder, ids: Sequence[int]) -> list[str]:
    return [decoder.push(i) for i in ids]


def test_stream_holds_back_split_characters(tok: BundleTokenizer) -> None:
    text = "Hello 🦙 world 鱻 🦜🧬🫠 龘齉靐 你好!"
    ids = tok.encode(text)
    # Sanity: this text really has tokens that end inside a UTF-8 character.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    pieces = stream(StreamDecoder(tok), ids)
    assert "" in pieces
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[0] == "Hello"  # complete text is not delayed
    decoder = StreamDecoder(tok)
    assert "".join(stream(decoder, ids)) + decoder.flush() == tok.decode(ids) == text


def test_stream_emits_a_character_when_its_last_byte_arrives(tok: BundleTokenizer) -> None:
    ids = tok.encode(" 🦙")  # three tokens carrying the emoji's four bytes
    assert len(ids) > 1
    pieces = stream(StreamDecoder(tok), ids)
    assert pieces == [""] * (len(ids) - 1) + [" 🦙"]


def test_stream_flush_returns_dangling_bytes(tok: BundleTokenizer) -> None:
    ids = tok.encode("ab 🦙")[:-1]  # ends mid-emoji
    decoder = StreamDecoder(tok)
    assert "".join(stream(decoder, ids)) == "ab"
    tail = decoder.flush()
    assert tail.startswith(" \ufffd") and "ab" + tail == tok.decode(ids)
    assert decoder.flush() == ""


def test_stream_special_tokens(tok: BundleTokenizer) -> None:
    ids = [IM_START, *tok.encode("assistant\n你好"), IM_END]
    for skip in (True, False):
        decoder = StreamDecoder(tok, skip_special_tokens=skip)
        assert "".join(stream(decoder, ids)) + decoder.flush() == tok.decode(ids, skip_special_tokens=skip)


def test_stream_matches_decode_on_random_ids(tok: BundleTokenizer) -> None:
    # Raw byte tokens (ids < 256) make invalid and interrupted UTF-8 common.
    rng = np.random.default_rng(7)
    for _ in range(100):
        n = int(rng.integers(1, 40))
        ids = np.where(rng.random(n) < 0.5, rng.integers(0, 256, n), rng.integers(0, tok.vocab_size, n)).tolist()
        decoder = StreamDecoder(tok)
        assert "".join(stream(decoder, ids)) + decoder.flush() == tok.decode(ids), ids


def test_stream_decodes_a_bounded_window(tok: BundleTokenizer) -> None:
    text = ("Streaming output, token by token; 流式输出 🎉. " * 40).strip()
    ids = tok.encode(text)
    assert len(ids) > 300
    recorder = RecordingDecoder(tok)
    decoder = StreamDecoder(recorder)  # type: ignore[arg-type]
    assert "".join(stream(decoder, ids)) + decoder.flush() == text
    assert max(recorder.lengths) <= 8


# --- StopMatcher -----------------------------------------------------------------------------


def test_stop_string_split_across_chunks() -> None:
    matcher = StopMatcher(["<|stop|>", "END"])
    assert matcher.feed("Hello <|st") == ("Hello ", False)
    assert matcher.feed("op|> trailing") == ("", True)
    assert matcher.stopped
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_held_prefix_completed_by_next_chunk() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("Ding") == ("", True)


def test_held_prefix_released_on_mismatch_and_flush() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("x E") == ("ENx ", False)
    assert matcher.flush() == "E"
    assert matcher.flush() == ""


def test_earliest_stop_wins_and_overlapping_prefixes() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)
    matcher = StopMatcher(["aab"])
    out = [matcher.feed(c) for c in "aaab"]
    assert "".join(t for t, _ in out) == "a"
    assert out[-1][1] and not any(hit for _, hit in out[:-1])


def test_no_stop_strings_passes_everything() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("anything <|im_end|>") == ("anything <|im_end|>", False)
    assert matcher.flush() == ""


def test_random_chunkings_cut_at_the_first_stop() -> None:
    rng = np.random.default_rng(11)
    stops = ["</answer>", "\n\nUser:", "停止"]
    text = "abc </ans </answe x\n\nUse 停 ok 停止 tail </answer>"
    expected = text[: text.find("停止")]
    for _ in range(200):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=int(rng.integers(0, 12)), replace=False).tolist())
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        matcher = StopMatcher(stops)
        emitted = []
        for chunk in chunks:
            piece, hit = matcher.feed(chunk)
            emitted.append(piece)
            if hit:
                break
        assert hit and "".join(emitted) == expected, chunks


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(InputError, match="non-empty"):
        StopMatcher(["ok", ""])


# --- torch-free import -----------------------------------------------------------------------


def test_runtime_imports_and_runs_without_torch(qwen_tokenizer_dir: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    import torch\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('torch was importable; the block failed')\n"
        "import numpy as np\n"
        "from qwen2edge.runtime import sampling, tokenizer\n"
        "tok = tokenizer.BundleTokenizer.from_dir(sys.argv[1])\n"
        "assert tok.decode(tok.encode(tok.chat_prompt('hi')), skip_special_tokens=False).endswith('assistant\\n')\n"
        "params = sampling.SamplingParams(temperature=0.7, top_k=5, seed=1)\n"
        "sampling.sample_next(np.zeros((2, 10), np.float32), params, sampling.make_rng(params.seed))\n"
        "print('OK', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
        "                   and sys.modules[m] is not None))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", script, str(qwen_tokenizer_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK []"
