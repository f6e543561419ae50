"""How the host matches the calls the API hands it to the request's calls: one at a time,
or a whole request at once when the API hands over the very calls the gate read."""

from __future__ import annotations

from signd.api.enclave_gatekeeper import _Claims, _same_calls
from signd.gate.operations import SigningCall, SigningKind


def test_claims_taken_all_at_once_only_when_none_is_taken() -> None:
    claims = _Claims()
    assert claims.take_all(3)
    assert claims.take(3, lambda position: True) is None
    assert not claims.take_all(3)
    partly = _Claims()
    assert partly.take(3, lambda position: position == 1) == 1
    assert not partly.take_all(3)
    assert partly.take(3, lambda position: True) == 0


def test_same_calls_are_the_same_objects_in_the_same_order() -> None:
    first, second = (SigningCall(SigningKind.HASH, "k", bytes([n]) * 32) for n in range(2))
    assert _same_calls((first, second), [first, second])
    assert not _same_calls((first, second), [second, first])
    assert not _same_calls((first,), [first, second])
    equal = SigningCall(SigningKind.HASH, "k", bytes(32))
    assert equal == first and not _same_calls((first,), [equal])
