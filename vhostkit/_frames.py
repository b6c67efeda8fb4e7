"""Keeping an exception after it was handled without keeping the frames it was raised in.

A stored exception's ``__traceback__`` holds every frame between the raise and the handler,
and each frame holds its locals: a half-built ring queue, a view of guest memory, a message
with its fds. Whatever outlives a vhost-user connection (a server's ``last_error``, a
listener's error lists) keeps the exception, never those frames.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["without_frames"]

E = TypeVar("E", bound=BaseException)


def without_frames(exc: E) -> E:
    """Drop the traceback of ``exc`` and of every exception chained to it; return ``exc``.

    Call it once the exception has been logged (a logged traceback is formatted then).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
        if isinstance(e, BaseExceptionGroup):
            todo += e.exceptions
    return exc
