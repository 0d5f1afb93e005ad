"""The ops' exception contract: one bad input, one exception type and message in every backend."""

from __future__ import annotations

from typing import Callable

import pytest


def errors_of(calls: dict[str, Callable]) -> dict[str, tuple[type, str]]:
    """(exception type, message) raised by each call; a call that does not raise fails the test."""
    out = {}
    for name, call in calls.items():
        with pytest.raises(Exception) as info:
            call()
        out[name] = (info.type, str(info.value))
    return out


def assert_one_error(errors: dict[str, tuple[type, str]], error: type, match: str, op: str) -> None:
    """Every way of calling ``op`` raised ``error`` with one and the same one-line message,
    which names the op and contains ``match``."""
    assert len(set(errors.values())) == 1, errors
    (kind, message), = set(errors.values())
    assert kind is error, errors
    assert message.startswith(f"{op}: ") and match in message and "\n" not in message, errors
