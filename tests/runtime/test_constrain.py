"""Constrained decoding with llguidance on random-weight models: outputs match their grammar for the real Qwen2
tokenizer and a small byte-level BPE, in static and in-flight batches next to unconstrained rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import jsonschema
import pytest

from qwen2edge.errors import InputError
from qwen2edge.runtime import constrain
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.constrain import Grammar
from qwen2edge.runtime.continuous import InFlightBatch
from qwen2edge.runtime.sampling import SamplingParams


# Every string and number bounded: the language is finite, so even random weights reach its end.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


CONTEXT = 256  # room for the longest SCHEMA output spelled one byte per token


@pytest.fixture(scope="module", params=["gqa", "small_vocab"])
def gen(request, tiny_bundle_factory):
    return Bundle.open(tiny_bundle_factory(request.param, max_seq_len=CONTEXT)[1]).generator()


def _sampled(seed: int, grammar: Grammar, n: int = 120) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed, grammar=grammar)


def test_json_schema_outputs_validate_over_seeds(gen):
    prompt = gen.tokenizer.encode("Describe a person as JSON:")
    grammar = Grammar.json_schema(SCHEMA)
    results, _ = gen.generate([prompt] * 12, [_sampled(seed, grammar) for seed in range(12)])
    for r in results:
        assert r.finish_reason == "stop", r
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert len({r.text for r in results}) > 6  # sampled, not one forced string
    greedy, _ = gen.generate([prompt], SamplingParams(max_new_tokens=120, grammar=grammar))
    jsonschema.validate(json.loads(greedy[0].text), SCHEMA)


@pytest.mark.parametrize("grammar, check", [
    (Grammar("regex", r"[a-z]{2,5}-[0-9]{3}"), lambda t: re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", t)),
    (Grammar("choice", json.dumps(["yes", "no", "maybe later"])), lambda t: t in ("yes", "no", "maybe later")),
    (Grammar("lark", 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/'),
     lambda t: re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", t)),
    (Grammar("lark", 'root ::= "<" [a-c]+ ">"'), lambda t: re.fullmatch(r"<[a-c]+>", t)),  # GBNF
    (Grammar.json_schema({"type": "object"}), lambda t: isinstance(json.loads(t), dict)),
])
def test_regex_choice_lark_and_any_object(gen, grammar, check):
    prompt = gen.tokenizer.encode("Answer:")
    results, _ = gen.generate([prompt] * 6, [_sampled(seed, grammar, 200) for seed in range(6)])
    done = [r for r in results if r.finish_reason == "stop"]
    assert len(done) >= 4, results  # an unbounded grammar may run out of tokens: those are "length"
    for r in done:
        assert check(r.text), r.text


def test_in_flight_rows_with_and_without_grammar(gen):
    """Per-row masks: constrained rows join a running batch next to plain ones; plain rows are untouched."""
    grammar = Grammar.json_schema(SCHEMA)
    plain = SamplingParams(max_new_tokens=20, stop_token_ids=(-1,))
    prompts = {key: gen.tokenizer.encode(text) for key, text in
               (("plain0", "Hello there"), ("json0", "JSON:"), ("json1", "A person"), ("plain1", "Once upon"))}
    params = {"plain0": plain, "plain1": plain, "json0": _sampled(1, grammar), "json1": _sampled(2, grammar)}
    batch, results = InFlightBatch(gen, slots=4), {}

    def step() -> None:
        batch.step(on_finish=lambda key, result: results.__setitem__(key, result))

    batch.admit([(key, gen.new_row(prompts[key], params[key])) for key in ("plain0", "json0")])
    for _ in range(3):
        step()
    batch.admit([(key, gen.new_row(prompts[key], params[key])) for key in ("json1", "plain1")])
    while len(batch):
        step()
    for key in params:
        alone = gen.generate([prompts[key]], params[key])[0][0]
        assert results[key].token_ids == alone.token_ids, key
        if key.startswith("json"):
            jsonschema.validate(json.loads(results[key].text), SCHEMA)


@pytest.mark.parametrize("grammar, needle", [
    (Grammar.json_schema({"type": "strin"}, "response_format"), "strin"),
    (Grammar.json_schema({"type": "string", "pattern": "(?=a)b"}, "response_format"), "look-around"),
    (Grammar.json_schema({"$ref": "#/$defs/missing"}, "guided_json"), "missing"),
    (Grammar("regex", "[a-", "guided_regex"), "unclosed character class"),
    (Grammar("lark", "start: foo", "guided_grammar"), 'unknown name: "foo"'),
    (Grammar("lark", "root ::= foo", "guided_grammar"), "Rule 'foo' not found"),
])
def test_bad_grammars_are_one_line_input_errors(grammar, needle):
    with pytest.raises(InputError) as exc:
        constrain.check(grammar)
    assert exc.value.options == [grammar.option] and needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_plain_generation_never_imports_the_grammar_engine(tiny_bundle_factory):
    """llguidance is only needed once a grammar is asked for; without it, that request says how to install it."""
    bundle = tiny_bundle_factory("gqa")[1]
    code = textwrap.dedent(f"""
        import sys
        sys.modules["llguidance"] = None  # as if not installed
        from qwen2edge.errors import InputError
        from qwen2edge.runtime.bundle import Bundle
        from qwen2edge.runtime.constrain import Grammar
        from qwen2edge.runtime.sampling import SamplingParams
        gen = Bundle.open({str(bundle)!r}).generator()
        res, _ = gen.generate([[9707, 11]], SamplingParams(max_new_tokens=3, logprobs=1, presence_penalty=1.0))
        assert len(res[0].token_ids) == 3
        try:
            gen.new_row([9707], SamplingParams(max_new_tokens=4, grammar=Grammar("regex", "a+")))
        except (InputError, ImportError) as exc:
            print("refused:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "llguidance" in out.stdout
