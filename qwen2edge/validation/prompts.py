"""The prompt set `qwen2edge compare` runs: built in (English, Chinese, code, math) or a user's JSONL.

JSONL format (one object per line; blank lines and lines starting with # are skipped):
  {"text": "...", "id": "name", "category": "english", "kind": "generate", "chat": true}
  - text (required): a non-empty string.
  - kind: "generate" (default: teacher-forced steps + free-running greedy from this prompt) or
    "perplexity" (the text is scored as-is: perplexity of the backend vs the reference).
  - id (default "line-N"), category (default "user"), chat (default true: wrap a "generate"
    prompt in the bundle's chat template when it has one; ignored for "perplexity").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

KINDS = ("generate", "perplexity")


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str
    kind: str = "generate"
    chat: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BUILTIN: tuple[Prompt, ...] = (
    Prompt("en-capital", "english", "What is the capital of France?"),
    Prompt("en-explain", "english", "Explain in two sentences why the sky is blue."),
    Prompt("zh-intro", "chinese", "用一句话介绍一下你自己。"),
    Prompt("zh-spring", "chinese", "写两句关于春天的诗。"),
    Prompt("code-reverse", "code", "Write a Python function that reverses a string."),
    Prompt("code-sql", "code", "Write an SQL query that counts the rows of a table named users."),
    Prompt("math-add", "math", "What is 17 + 25? Answer with the number."),
    Prompt("math-area", "math", "A rectangle is 6 cm wide and 4 cm tall. What is its area?"),
    Prompt("ppl-en", "english", "The river rose through the night, and by morning the low fields along the valley "
           "were under water. Farmers moved their animals to the hills while the town council opened "
           "the school as a shelter for families whose houses had flooded.", kind="perplexity"),
    Prompt("ppl-zh", "chinese", "今天早上天气很好，我和朋友一起去公园散步。公园里有很多人在跑步、打太极拳，"
           "还有孩子们在草地上放风筝。我们走了一个小时，然后在湖边的咖啡馆喝了茶。", kind="perplexity"),
    Prompt("ppl-code", "code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
           "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
           "print([fibonacci(i) for i in range(10)])\n", kind="perplexity"),
    Prompt("ppl-math", "math", "To solve 3x + 5 = 20, subtract 5 from both sides to get 3x = 15, then divide "
           "both sides by 3, so x = 5. Check: 3 * 5 + 5 = 20, which is correct.", kind="perplexity"),
)


def load_prompts(path: str | Path) -> tuple[Prompt, ...]:
    """Read a JSONL prompt file (format in the module docstring); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist: pass a JSONL file (see docs/compare.md)")
    out: list[Prompt] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON ({exc.msg}): write one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise InputError(f'{where} has no non-empty "text": write e.g. {{"text": "Hello"}}')
        unknown = sorted(set(obj) - {"text", "id", "category", "kind", "chat"})
        if unknown:
            raise InputError(f"{where} has unknown keys {unknown}: use text, id, category, kind, chat")
        kind = obj.get("kind", "generate")
        if kind not in KINDS:
            raise InputError(f'{where} has kind {kind!r}: use "generate" or "perplexity"')
        out.append(Prompt(str(obj.get("id", f"line-{n}")), str(obj.get("category", "user")), obj["text"], kind,
                          bool(obj.get("chat", True))))
    if not out:
        raise InputError(f"{path} holds no prompts: add at least one line like {{\"text\": \"Hello\"}}")
    ids = [p.id for p in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{path} repeats prompt ids {dup}: give every line a unique id")
    return tuple(out)
