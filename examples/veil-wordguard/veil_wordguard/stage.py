"""The ``wordguard`` stage: the request-path side of the plugin."""

from __future__ import annotations

from veil import BadRequest, Call

from .guard import WordGuard, WordGuardSettings

__all__ = ["BLOCKED_MESSAGE", "HEADER", "WordGuardStage"]

BLOCKED_MESSAGE = "the request contains a term this gateway's policy blocks"
"""What the client is told. It names neither the term nor the text: an error
message must never echo request content (it reaches logs and dashboards)."""

HEADER = "x-wordguard"
"""The response header the stage adds to calls it let through."""


class WordGuardStage:
    """Refuses chat calls whose system, developer or user text contains a
    blocked term; marks the calls it lets through with ``x-wordguard``."""

    name = "wordguard"

    def __init__(self, settings: WordGuardSettings) -> None:
        self.guard = WordGuard(settings.blocked)
        self.header = settings.header

    async def on_request(self, call: Call) -> None:
        """Check the call before it goes upstream.

        :raises BadRequest: 400 ``blocked_word`` when a blocked term occurs.
        """
        if call.kind == "chat":
            found = self.guard.count_request(call.request)
            if found:
                # For audit: how many, never which term nor where.
                call.decide(self.name, "blocked", count=found)
                raise BadRequest(BLOCKED_MESSAGE, code="blocked_word", param="messages")
        if self.header:
            # Set before the upstream call, so streaming responses carry it too.
            call.response_headers[HEADER] = "checked"
