"""One small exception hierarchy; the CLI and the server turn each class into a one-line message, an exit
code or an HTTP status.

A message names the fix in the terms of the interface that was used: the library writes an option as
`{opt:max_new_tokens}`, and `render` spells it as that interface does (`--max-new-tokens` on the command
line, `max_tokens` in an HTTP body). `str(exc)` spells options by their library names.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

_OPTION = re.compile(r"\{opt:(\w+)\}")

Spelling = Callable[[str], str]


def cli_spelling(name: str) -> str:
    """`max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def field_spelling(fields: Mapping[str, str]) -> Spelling:
    """Spell options as request fields: `fields` renames the ones whose field name differs; others keep
    their library name (quoted, as OpenAI's messages quote parameters)."""
    return lambda name: f"'{fields.get(name, name)}'"


class Qwen2EdgeError(Exception):
    """Base class. The message must name the problem and the fix, on one line."""

    exit_code = 1

    @property
    def template(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def options(self) -> list[str]:
        """Library names of the options the message refers to, in order."""
        return _OPTION.findall(self.template)

    def render(self, spell: Spelling = lambda name: name) -> str:
        """The message with every option spelled by `spell`."""
        return _OPTION.sub(lambda m: spell(m.group(1)), self.template)

    def __str__(self) -> str:
        return self.render()


class InputError(Qwen2EdgeError):
    """Bad user input: paths, config, weights, CLI values, prompts."""

    exit_code = 2


class ExportError(Qwen2EdgeError):
    """Tracing, checking or writing an ONNX bundle failed."""

    exit_code = 3


class BuildError(Qwen2EdgeError):
    """Building a TensorRT engine failed."""

    exit_code = 4


class ValidationError(Qwen2EdgeError):
    """A comparison against the reference is outside tolerance."""

    exit_code = 5


class InferenceError(Qwen2EdgeError):
    """Loading or running a bundle or engine failed at run time."""

    exit_code = 6


class BundleError(InputError):
    """An artifact directory is missing its manifest or fails its checksums."""


class InternalError(Qwen2EdgeError):
    """A qwen2edge bug: an internal contract was broken (the message says to report it)."""
