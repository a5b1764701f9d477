"""A validated request -> the generations that answer it: each prompt's token ids and, per candidate,
the SamplingParams of its row (penalties, bias, grammar, logprobs, seed).

A request with P prompts and n choices (best_of candidates) becomes P x best_of rows, queued together;
candidate c of every prompt samples with seed + c (vLLM's rule), so a choice is reproducible on its own and
a prompt's choices equal the same prompt sent alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

import anyio

from ..errors import InputError, field_spelling
from ..runtime import constrain
from ..runtime.constrain import Grammar
from ..runtime.sampling import SamplingParams
from . import tools
from .schemas import APIError, ChatRequest, CompletionRequest

# Library option names -> the request fields that set them (the rest share their name).
HTTP_FIELDS = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def input_error(exc: InputError, param: str | None = None) -> APIError:
    """A library InputError as a 400, worded in request fields rather than CLI flags."""
    named = exc.options
    return APIError(400, exc.render(field_spelling(HTTP_FIELDS)),
                    param=param or (HTTP_FIELDS.get(named[0], named[0]) if named else None), code="invalid_value")


@dataclass
class Candidate:
    """One row to generate: candidate `choice` of prompt `prompt`."""

    prompt: int
    choice: int
    params: SamplingParams


@dataclass
class Plan:
    prompts: list[list[int]]
    texts: list[str]  # each prompt as text (what echo returns)
    n: int  # choices returned per prompt
    candidates: list[Candidate] = field(default_factory=list)  # prompt-major, best_of per prompt
    best_of: int = 1
    generate: bool = True  # False: max_tokens 0, the prompt is only scored
    score: int | None = None  # echo + logprobs: alternatives per prompt position
    logprobs: int | None = None  # alternatives per generated token in the response (None: no logprobs)
    tools: bool = False  # parse the output for tool calls


async def completion_plan(state: Any, req: CompletionRequest) -> Plan:
    prompts, texts = [], []
    for prompt in req.prompts():
        ids, text = await _prompt_ids(state, prompt)
        prompts.append(ids)
        texts.append(text if req.echo else "")
    n, best_of = req.n, req.best_of or req.n
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be >= n ({n}): raise best_of or lower n", param="best_of")
    if best_of > n and req.stream:
        raise APIError(400, "best_of > n cannot be streamed (the best choices are known only at the end): drop "
                       "stream or best_of", param="best_of")
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens 0 generates nothing: set echo to score the prompt, or ask for tokens",
                       param="max_tokens")
    plan = Plan(prompts, texts, n, best_of=best_of, generate=max_tokens > 0,
                score=req.logprobs if req.echo and req.logprobs is not None else None, logprobs=req.logprobs)
    # Ranking candidates needs each one's log-probability even when the response shows none.
    row_logprobs = req.logprobs if req.logprobs is not None else (0 if best_of > n else None)
    grammar = await _grammar(state, req, None)
    for p, ids in enumerate(prompts):
        if not plan.generate:
            _check_context(state, len(ids), 0, "prompt")
        for c in range(best_of if plan.generate else 0):
            params = sampling(state, req, len(ids), max_tokens, "prompt", grammar, row_logprobs, c)
            plan.candidates.append(Candidate(p, c, params))
    _check_room(state, plan)
    return plan


async def chat_plan(state: Any, req: ChatRequest) -> Plan:
    tools.check_choice(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    text = tools.render(state.tokenizer, req)
    ids = await encode(state, text, "messages")
    forced = tools.forced_grammar(req)
    grammar = await _grammar(state, req, forced)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    plan = Plan([ids], [""], req.n, logprobs=logprobs, tools=tools.wants_tools(req))
    for c in range(req.n):
        params = sampling(state, req, len(ids), req.max_completion_tokens or req.max_tokens, "messages", grammar,
                          logprobs, c)
        plan.candidates.append(Candidate(0, c, params))
    _check_room(state, plan)
    return plan


def sampling(state: Any, req: Union[ChatRequest, CompletionRequest], prompt_len: int, max_tokens: int | None,
             param: str, grammar: Grammar | None, logprobs: int | None, choice: int) -> SamplingParams:
    """One candidate's SamplingParams, after the context-length check."""
    if max_tokens is None:  # chat: up to the rest of the context, as OpenAI does
        max_tokens = state.bundle.max_seq_len - prompt_len
    _check_context(state, prompt_len, max(max_tokens, 1), param)
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                              seed=None if req.seed is None else (req.seed + choice) % 2**63,
                              stop_strings=tuple(req.stop or ()), presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, logit_bias=_logit_bias(state, req),
                              min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, logprobs=logprobs,
                              grammar=grammar)
    except InputError as exc:
        raise input_error(exc) from None


def _check_context(state: Any, prompt_len: int, max_tokens: int, param: str) -> None:
    limit = state.bundle.max_seq_len
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the "
                       f"completion). Please reduce the length of the {param} or the completion.", param=param,
                       code="context_length_exceeded")


def _logit_bias(state: Any, req: Union[ChatRequest, CompletionRequest]) -> tuple[tuple[int, float], ...]:
    vocab = state.bundle.config.vocab_size
    out = []
    for key, bias in (req.logit_bias or {}).items():
        tid = int(key) if key.strip().isdigit() else -1
        if not 0 <= tid < vocab:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{vocab - 1}): key the "
                           "biases by token id", param="logit_bias")
        out.append((tid, bias))
    return tuple(out)


async def _grammar(state: Any, req: Union[ChatRequest, CompletionRequest], forced: Grammar | None) -> Grammar | None:
    """The one constraint of a request (response_format, a guided_* extension or a forced tool call),
    compiled once here so a bad one is a 400 before anything is queued."""
    found: list[Grammar] = [forced] if forced is not None else []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(Grammar.json_schema({"type": "object"}, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format of type 'json_schema' needs a 'json_schema' object with 'name' and "
                           "'schema'", param="response_format.json_schema")
        found.append(Grammar.json_schema(fmt.json_schema.schema_ or {}, "response_format"))
    if req.guided_json is not None:
        found.append(Grammar.json_schema(req.guided_json, "guided_json"))
    if req.guided_regex is not None:
        found.append(Grammar("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        found.append(Grammar("choice", json.dumps(req.guided_choice), "guided_choice"))
    if req.guided_grammar is not None:
        found.append(Grammar("lark", req.guided_grammar, "guided_grammar"))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"'{g.option}'" for g in found)
        raise APIError(400, f"{names} each constrain the output: give only one", param=found[1].option)
    grammar = found[0]
    try:
        await anyio.to_thread.run_sync(constrain.check, grammar)
        # Built once per server (1-2 s for a large vocabulary), off the event loop.
        await anyio.to_thread.run_sync(state.generator.grammar_engine)
    except InputError as exc:
        raise input_error(exc, param=grammar.option) from None
    return grammar


async def _prompt_ids(state: Any, prompt: Union[str, list[int]]) -> tuple[list[int], str]:
    """Token ids and text of one completion prompt (text is tokenized off the event loop)."""
    if isinstance(prompt, str):
        ids, text = await encode(state, prompt, "prompt"), prompt
    else:
        vocab = state.bundle.config.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        ids, text = list(prompt), state.tokenizer.decode(prompt, skip_special_tokens=False)
    if not ids:
        raise APIError(400, "prompt encodes to no tokens: give some text", param="prompt")
    return ids, text


async def encode(state: Any, text: str, param: str) -> list[int]:
    """Token ids, off the event loop (long texts release the GIL too, see BundleTokenizer.encode). Text that
    cannot fit the context is refused by its length first: tokenizing a 7 MiB prompt held the GIL for
    seconds and stalled every other client. Text that is not valid Unicode is a 400."""
    if len(text) > state.max_prompt_chars:
        raise APIError(400, f"This model's maximum context length is {state.bundle.max_seq_len} tokens, and no text "
                       f"longer than {state.max_prompt_chars} characters fits in it; the {param} has {len(text)} "
                       f"characters. Please reduce the length of the {param}.", param=param,
                       code="context_length_exceeded")
    try:
        return await anyio.to_thread.run_sync(state.tokenizer.encode, text)
    except InputError as exc:  # a lone surrogate
        raise APIError(400, exc.render(field_spelling({**HTTP_FIELDS, "prompt": param})), param=param,
                       code="invalid_value") from None


def _check_room(state: Any, plan: Plan) -> None:
    """A request needing more rows than the server can ever hold at once is refused outright (a 429
    would have the client retry forever)."""
    rows = len(plan.candidates) + (len(plan.prompts) if plan.score is not None else 0)
    room = state.scheduler.capacity + state.settings.max_queue
    if rows > room:
        raise APIError(400, f"this request needs {rows} generations ({len(plan.prompts)} prompts x {plan.best_of} "
                       f"choices), more than this server queues at once ({room}): send fewer prompts or choices",
                       param="n")
