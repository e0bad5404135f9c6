"""Running a coroutine up to its first wait, and finishing it later.

Most awaits on the request path complete without waiting (a stage that looks
something up in memory, a stream chunk already read). Driving such a
coroutine with ``send(None)`` finishes it without the cost of a task step,
a timer or a generator layer; when it does wait, :class:`Resume` finishes
it inside the awaiting task, exactly as if it had been awaited from the
start.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

__all__ = ["Resume"]


class Resume:
    """Finish awaiting a coroutine already driven up to a wait: hand what it
    yielded there (a future, or ``None``) to the running task, and drive it
    on with what the task sends or throws in (a cancellation included).

    ``await Resume(coro, yielded)`` returns what ``coro`` returns and raises
    what it raises."""

    __slots__ = ("step", "yielded")

    def __init__(self, step: Any, yielded: Any) -> None:
        self.step, self.yielded = step, yielded

    def __await__(self) -> Generator[Any, None, Any]:
        yielded = self.yielded
        while True:
            try:
                yield yielded
            except BaseException as e:  # cancellation, thrown into the waiting coroutine
                try:
                    yielded = self.step.throw(e)
                except StopIteration as done:
                    return done.value
                continue
            try:
                yielded = self.step.send(None)
            except StopIteration as done:
                return done.value
