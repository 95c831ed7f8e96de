"""The OpenAI request bodies the server accepts, checked field by field into SamplingParams and a Policy.

Every problem is an `APIError` with an OpenAI error body (`{"error": {"message", "type", "param", "code"}}`)
and a 4xx status, or a `checks.InvalidValue` for a field out of its type or range, which the server answers
with a 400 naming the field; the server never turns bad input into a 500. Fields OpenAI defines that this engine does
not implement (logprobs, tools, penalties, ...) are refused by name rather than ignored, and so are fields
OpenAI does not define. A null value means "not given", as in OpenAI's API.

The `rstitch` field routes one request (docs/serving.md, 'What a hybrid engine adds'):
`{"policy": "rstitch", "tau": 0.05}`, `{"policy": "spec", "k": 4}`, `{"policy": "llm"}`,
`{"policy": "rstitch:0.05:down0.02"}` (the CLI's policy grammar), `{"policy": "rstitch+"}` (the router the
server loaded), and `"return_sources": true` for per-token sources and entropies.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import checks
from .. import policies as P
from ..sampling_params import SEED_MAX, SamplingParams

MAX_CHOICES = 16  # n times the number of prompts, per request


class APIError(Exception):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "BadRequestError", headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.headers = message, status, param, type, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


# Fields OpenAI defines that are accepted only at their no-op value (anything else: 400 naming the field).
NO_OP_FIELDS = {"logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
                "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
                "logit_bias": ({},), "suffix": ("",), "parallel_tool_calls": (False,), "store": (False,),
                "tools": ([],), "functions": ([],)}
IGNORED_FIELDS = {"user", "metadata", "service_tier"}  # informational only
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n",
                 "stream", "stream_options", "ignore_eos", "min_tokens", "skip_special_tokens", "rstitch"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "chat_template_kwargs"}
# The policies a request may name, each with the fields of its dataclass a request may set (all but those the
# server or the benchmarks own: the loaded router, its sampling temperature, forced acceptance rates).
REQUEST_POLICIES = {"llm": P.LLMOnly, "slm": P.SLMOnly, "rstitch": P.RStitch, "spec": P.SpecDecode,
                    "rstitch+": P.RStitchPlus}
NOT_PER_REQUEST = {"router", "temperature", "accept_rate"}
POLICY_FIELDS = {name: {f.name for f in dataclasses.fields(cls) if f.init and f.name not in NOT_PER_REQUEST}
                 for name, cls in REQUEST_POLICIES.items()}
RSTITCH_FIELDS = {"policy", "router", "return_sources"}.union(*POLICY_FIELDS.values())


@dataclass
class ParsedRequest:
    prompts: list            # strings or token-id lists (completions) / conversations (chat)
    params: list[SamplingParams]  # one per choice
    policy: P.Policy | None  # None: the server's default
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_sources: bool
    model: str | None
    chat_template_kwargs: dict
    max_tokens_given: bool   # False: max_tokens is the context left (vLLM's default)


def _type_error(name: str, want: str, value) -> APIError:
    return APIError(f"'{name}' must be {want}, got {value!r:.100}", param=name)


def _field(body: dict, name: str, check, *args, **kw):
    """body[name] through `check` (rstitch_engine.checks; its InvalidValue is a 400 naming the field), or None."""
    value = body.get(name)
    return None if value is None else check(name, value, *args, **kw)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = _field(body, name, checks.flag)
    return default if value is None else value


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in IGNORED_FIELDS or value is None:
            continue
        if name in NO_OP_FIELDS:
            if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in NO_OP_FIELDS[name]):
                continue
            raise APIError(f"'{name}' is not supported by this server", param=name)
        raise APIError(f"unknown field '{name}'", param=name)


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise _type_error("stop", "a non-empty string or a list of up to 16 of them", stop)
    return stops


def _policy(body: dict, router) -> tuple[P.Policy | None, bool]:
    spec = body.get("rstitch")
    if spec is None:
        return None, False
    if not isinstance(spec, dict):
        raise _type_error("rstitch", 'an object like {"policy": "rstitch", "tau": 0.05}', spec)
    unknown = sorted(set(spec) - RSTITCH_FIELDS)
    if unknown:
        raise APIError(f"unknown field 'rstitch.{unknown[0]}'; use {', '.join(sorted(RSTITCH_FIELDS))}",
                       param=f"rstitch.{unknown[0]}")
    return_sources = _bool(spec, "return_sources")
    name = spec.get("policy")
    if name is None:
        if set(spec) - {"return_sources"}:
            raise APIError("'rstitch.policy' is required with routing fields", param="rstitch.policy")
        return None, return_sources
    if not isinstance(name, str):
        raise _type_error("rstitch.policy", "a string", name)
    fields = {k: v for k, v in spec.items() if k not in ("policy", "return_sources", "router") and v is not None}
    try:
        if ":" in name:  # the CLI grammar: the whole policy in one string
            if fields:
                raise APIError(f"'rstitch.policy' {name!r} already says everything; drop {sorted(fields)}",
                               param="rstitch.policy")
            policy = P.parse_policy(name)
        elif name not in REQUEST_POLICIES:
            raise APIError(f"unknown 'rstitch.policy' {name!r}; use {', '.join(REQUEST_POLICIES)} or a policy "
                           f"string such as 'rstitch:0.05'", param="rstitch.policy")
        else:
            extra = sorted(set(fields) - POLICY_FIELDS[name])
            if extra:
                raise APIError(f"'rstitch.{extra[0]}' does not apply to policy {name!r}", param=f"rstitch.{extra[0]}")
            if name == "rstitch+":
                if router is None:
                    raise APIError("policy 'rstitch+' needs a router: start the server with --router",
                                   param="rstitch.policy")
                fields["router"] = router
            policy = REQUEST_POLICIES[name](**fields)
    except APIError:
        raise
    except checks.InvalidValue as e:
        raise APIError(f"rstitch.{e}", param=f"rstitch.{e.name}") from None
    except (ValueError, TypeError) as e:
        raise APIError(f"rstitch: {e}", param="rstitch") from None
    if spec.get("router") is not None:
        if not isinstance(policy, P.RStitchPlus):
            raise APIError("'rstitch.router' applies to policy 'rstitch+' only", param="rstitch.router")
        if str(spec["router"]) != str(router):
            raise APIError(f"router {spec['router']!r:.200} is not loaded; this server loaded {str(router)!r}",
                           param="rstitch.router")
    return policy, return_sources


def parse_request(body, *, chat: bool, router, max_model_len: int) -> ParsedRequest:
    """`router`: the path of the R-Stitch+ router the server loaded (None: rstitch+ is refused); `max_tokens`
    defaults to the context left, as in vLLM."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if chat:
        prompts = [_messages(body.get("messages"))]
    else:
        prompts = _prompts(body.get("prompt"))
    max_tokens = _field(body, "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None
                        else "max_tokens", checks.integer, 1)
    n = _field(body, "n", checks.integer, 1, MAX_CHOICES) or 1
    if n * len(prompts) > MAX_CHOICES:
        raise APIError(f"n x prompts = {n * len(prompts)} choices; at most {MAX_CHOICES} per request", param="n")
    temperature = _field(body, "temperature", checks.number, 0.0, 2.0)
    top_p = _field(body, "top_p", checks.number, 0.0, 1.0, low_open=True)
    top_k = _field(body, "top_k", checks.integer, -1)
    seed = _field(body, "seed", checks.integer, 0, SEED_MAX)
    min_tokens = _field(body, "min_tokens", checks.integer, 0) or 0
    stream_options = body.get("stream_options")
    stream = _bool(body, "stream")
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "continuous_usage_stats"}:
            raise _type_error("stream_options", '{"include_usage": bool, "continuous_usage_stats": bool}',
                              stream_options)
        if not stream:
            raise APIError("'stream_options' needs \"stream\": true", param="stream_options")
    stream_options = stream_options or {}
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise _type_error("chat_template_kwargs", "an object", template_kwargs)
    policy, return_sources = _policy(body, router)
    base = dict(max_tokens=max_tokens if max_tokens is not None else max_model_len,
                temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
                top_k=top_k or 0, stop=_stop(body), stop_token_ids=_field(body, "stop_token_ids", checks.token_ids),
                ignore_eos=_bool(body, "ignore_eos"), min_tokens=min_tokens,
                skip_special_tokens=_bool(body, "skip_special_tokens", True))
    # choice j of a seeded request samples with seed + j, so that n > 1 gives n different samples
    params = [SamplingParams(**base, seed=None if seed is None else (seed + j) % 2**63) for j in range(n)]
    return ParsedRequest(prompts, params, policy, n, stream, _bool(stream_options, "include_usage"),
                         _bool(stream_options, "continuous_usage_stats"), return_sources, model, template_kwargs,
                         max_tokens is not None)


def check_lengths(parsed: ParsedRequest, prompt_ids: list[list[int]], *, max_model_len: int, kv_tokens: int) -> None:
    """Admission checks of a given max_tokens, as 400s naming the field (vLLM's): each prompt plus max_tokens
    within the context, and the n choices of a prompt within the KV cache at once (n x (prompt + max_tokens)
    tokens; more would only run by preempting each other). Too long a prompt alone is the scheduler's
    refusal."""
    if not parsed.max_tokens_given:
        return
    max_tokens = parsed.params[0].max_tokens
    for ids in prompt_ids:
        if len(ids) >= max_model_len:
            continue
        if len(ids) + max_tokens > max_model_len:
            raise APIError(f"the context holds {max_model_len} tokens: the prompt's {len(ids)} plus 'max_tokens' "
                           f"{max_tokens} do not fit; ask for at most {max_model_len - len(ids)}", param="max_tokens")
        need = parsed.n * (len(ids) + max_tokens)
        if need > kv_tokens:
            raise APIError(f"'n' {parsed.n} x (prompt {len(ids)} + max_tokens {max_tokens}) = {need} tokens of KV "
                           f"at once; the KV cache holds {kv_tokens}", param="n")


def _prompts(prompt) -> list:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    def ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) and prompt:
        return [prompt]
    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or ids(p) for p in prompt):
        return list(prompt)
    if prompt is None:
        raise APIError("'prompt' is required", param="prompt")
    raise _type_error("prompt", "a non-empty string, a list of strings, or token ids", prompt)


def _messages(messages) -> list[dict]:
    if messages is None:
        raise APIError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty list of messages", messages)
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, 'an object {"role", "content"}', m)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise _type_error(f"{where}.role", "one of system, developer, user, assistant", role)
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"'{where}.content': only text parts are supported, got {part!r:.100}",
                                   param=f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string or a list of text parts", content)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise APIError(f"'{where}.{extra[0]}' is not supported by this server", param=f"{where}.{extra[0]}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out
