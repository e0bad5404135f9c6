"""Checks on request bodies, before anything else sees them.

Hand-written rather than schema-driven: they run on every call and must cost
microseconds. They check what the gateway and its stages rely on (types of
known fields, required fields) and leave the rest to the upstream; fields
veil does not know pass through untouched.
"""

from __future__ import annotations

from typing import Any

from .errors import BadRequest

__all__ = ["validate_chat", "validate_embeddings"]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _bad(message: str, param: str, code: str = "invalid_value") -> BadRequest:
    return BadRequest(message, param=param, code=code)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is not None and (not _is_num(v) or not lo <= v <= hi):
        raise _bad(f"'{name}' must be a number between {lo:g} and {hi:g}.", name)


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> None:
    v = body.get(name)
    if v is not None and (not _is_int(v) or v < lo or (hi is not None and v > hi)):
        rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"'{name}' must be an integer {rng}.", name)


def _model(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise _bad(
            "'model' is required: name the model to use.", "model", "missing_required_parameter"
        )
    if not isinstance(model, str):
        raise _bad("'model' must be a string.", "model", "invalid_type")
    if not model.strip():
        raise _bad("'model' must not be empty.", "model")


def _content(content: Any, i: int, role: str) -> None:
    if content is None:
        if role in ("assistant", "function"):
            return
        raise _bad(
            f"messages[{i}].content is required for role '{role}'.", f"messages[{i}].content"
        )
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(
            f"messages[{i}].content must be a string or an array of content parts.",
            f"messages[{i}].content",
            "invalid_type",
        )
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(f"{where} must be an object with a 'type'.", where, "invalid_type")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _bad(f"{where}.text must be a string.", f"{where}.text", "invalid_type")


def _messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise _bad(
            "'messages' is required: give at least one message.",
            "messages",
            "missing_required_parameter",
        )
    if not isinstance(messages, list):
        raise _bad("'messages' must be an array of message objects.", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must contain at least one message.", "messages", "empty_array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object.", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _bad(
                f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}.",
                f"messages[{i}].role",
            )
        if (
            role == "assistant"
            and m.get("content") is None
            and "tool_calls" not in m
            and "function_call" not in m
        ):
            raise _bad(
                f"messages[{i}]: an assistant message needs content or tool_calls.",
                f"messages[{i}].content",
            )
        _content(m.get("content"), i, role)
        tool_calls = m.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant" or not isinstance(tool_calls, list):
                raise _bad(
                    f"messages[{i}].tool_calls must be an array, on an assistant message.",
                    f"messages[{i}].tool_calls",
                )
            for j, tc in enumerate(tool_calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if (
                    not isinstance(fn, dict)
                    or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("arguments"), str)
                ):
                    raise _bad(
                        f"messages[{i}].tool_calls[{j}] needs function.name and "
                        "function.arguments (a JSON string).",
                        f"messages[{i}].tool_calls[{j}]",
                    )
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise _bad(
                f"messages[{i}].tool_call_id is required for role 'tool'.",
                f"messages[{i}].tool_call_id",
                "missing_required_parameter",
            )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad(
                f"messages[{i}].name must be a string.", f"messages[{i}].name", "invalid_type"
            )


def _tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array.", "tools", "invalid_type")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if (
                not isinstance(t, dict)
                or t.get("type") not in ("function", "custom")
                or (
                    t.get("type") == "function"
                    and not (
                        isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]
                    )
                )
            ):
                raise _bad(
                    f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.",
                    f"tools[{i}]",
                )
            params = fn.get("parameters") if isinstance(fn, dict) else None
            if params is not None and not isinstance(params, dict):
                raise _bad(
                    f"tools[{i}].function.parameters must be a JSON schema object.",
                    f"tools[{i}].function.parameters",
                    "invalid_type",
                )
    choice = body.get("tool_choice")
    if choice is not None and not (
        choice in ("none", "auto", "required") or isinstance(choice, dict)
    ):
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or an object.", "tool_choice")


def validate_chat(body: Any) -> None:
    """Check a chat-completions body.

    :raises BadRequest: naming the offending field in ``param``.
    """
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_type")
    _model(body)
    _messages(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.", "stream", "invalid_type")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
        if "include_usage" in opts and not isinstance(opts["include_usage"], bool):
            raise _bad(
                "'stream_options.include_usage' must be true or false.",
                "stream_options.include_usage",
                "invalid_type",
            )
    _int(body, "n", 1, 128)
    _int(body, "max_tokens", 1)
    _int(body, "max_completion_tokens", 1)
    _int(body, "seed", -(2**63), 2**63 - 1)
    _int(body, "top_logprobs", 0, 20)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    for flag in ("logprobs", "parallel_tool_calls", "store"):
        v = body.get(flag)
        if v is not None and not isinstance(v, bool):
            raise _bad(f"'{flag}' must be true or false.", flag, "invalid_type")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        raise _bad("'stop' must be a string or an array of up to 4 strings.", "stop")
    _tools(body)
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise _bad(
                "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                "response_format",
            )
        if kind == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
            raise _bad(
                "'response_format.json_schema' is required for type 'json_schema'.",
                "response_format.json_schema",
                "missing_required_parameter",
            )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string.", "user", "invalid_type")
    meta = body.get("metadata")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _bad("'metadata' must be an object of string values.", "metadata", "invalid_type")
    bias = body.get("logit_bias")
    if bias is not None and not (isinstance(bias, dict) and all(_is_num(v) for v in bias.values())):
        raise _bad("'logit_bias' must map token ids to numbers.", "logit_bias", "invalid_type")


def validate_embeddings(body: Any) -> None:
    """Check an embeddings body.

    :raises BadRequest: naming the offending field in ``param``.
    """
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_type")
    _model(body)
    inp = body.get("input")
    if inp is None:
        raise _bad("'input' is required.", "input", "missing_required_parameter")
    ok = isinstance(inp, str) or (
        isinstance(inp, list)
        and inp
        and (
            all(isinstance(x, str) for x in inp)
            or all(_is_int(x) for x in inp)
            or all(isinstance(x, list) and x and all(_is_int(y) for y in x) for x in inp)
        )
    )
    if not ok:
        raise _bad(
            "'input' must be a string, an array of strings, or token arrays (non-empty).",
            "input",
        )
    if isinstance(inp, list) and len(inp) > 2048:
        raise _bad("'input' may hold at most 2048 items.", "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    _int(body, "dimensions", 1)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string.", "user", "invalid_type")
