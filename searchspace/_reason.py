"""An exception as the one line that a record, a note or a config error gives for it."""

from __future__ import annotations

import re

__all__ = ["first_line"]

#: Terminal colour codes: the ONNX exporter colours its step names ("This is step 2/3").
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, *, named: bool = True, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message without colour codes, at most ``limit``
    characters: after the exception's type name where ``named``, else alone (the type name where
    the message is empty)."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return (f"{type(exc).__name__}: {text}" if named else text or type(exc).__name__)[:limit]
