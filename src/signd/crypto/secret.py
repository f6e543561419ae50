"""Wrappers that keep secrets out of reprs, logs and error messages."""

from __future__ import annotations

from typing import Final

_MASK: Final = "**********"


class Secret:
    """A secret string or byte string that prints as a mask.

    Use :meth:`reveal` at the single point that needs the value; ``str``, ``repr`` and
    f-strings never show it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        self._value = value

    def reveal(self) -> str | bytes:
        return self._value

    def reveal_bytes(self) -> bytes:
        """The value as bytes (UTF-8 for a text secret)."""
        value = self._value
        return value.encode() if isinstance(value, str) else value

    def __repr__(self) -> str:
        return f"Secret({_MASK})"

    def __str__(self) -> str:
        return _MASK

    def __format__(self, format_spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        import hmac

        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self.reveal_bytes(), other.reveal_bytes())

    def __hash__(self) -> int:
        return hash(_MASK)

    def __bool__(self) -> bool:
        return bool(self._value)
