"""The request bodies sent by every load generator, and the API key used against veil."""

from __future__ import annotations

import hashlib

import orjson

MODEL = "bench-model"
API_KEY = "sk-veil-bench-7f3c9a1e5b2d4f6081a2c3e4d5f60718"
"""Bearer token sent to every target (only veil checks it; its sha256 goes in the policy)."""

SYSTEM_PROMPT = (
    "You are a careful assistant for an internal support desk. Answer in plain English, "
    "cite the relevant policy section when you rely on one, never invent ticket numbers, "
    "and keep answers under five sentences unless the user explicitly asks for more "
    "detail. If a question is ambiguous, ask one short clarifying question first."
)
USER_PROMPT = (
    "Our nightly export job started failing after last week's deploy: it writes about "
    "two gigabytes of CSV to the shared bucket and now stops halfway with a permission "
    "error on the second part file. Nothing changed in the job itself. What are the most "
    "likely causes, and which logs should I check first before opening a ticket?"
)


def chat_body(stream: bool) -> dict[str, object]:
    """A realistic chat completion request (system + user message of ~300 chars each)."""
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def chat_body_bytes(stream: bool) -> bytes:
    """The request body, serialised once, as sent on the wire."""
    return orjson.dumps(chat_body(stream))


def api_key_sha256(key: str = API_KEY) -> str:
    """Hex sha256 of the API key string, as the policy's ``[[keys]] sha256`` expects."""
    return hashlib.sha256(key.encode()).hexdigest()
