"""The request-body limit fits the one enclave frame that carries a request to the gate."""

from __future__ import annotations

import pytest

from signd.api.settings import MAX_BODY_BYTES, ApiSettings
from signd.enclave.protocol import DEFAULT_MAX_FRAME_SIZE
from signd.errors import ConfigurationError


def test_the_default_body_limit_leaves_room_in_an_enclave_frame() -> None:
    assert ApiSettings().max_body_bytes == MAX_BODY_BYTES
    assert MAX_BODY_BYTES * 2 <= DEFAULT_MAX_FRAME_SIZE


def test_a_body_limit_over_half_a_frame_is_refused() -> None:
    ApiSettings(max_body_bytes=MAX_BODY_BYTES)
    with pytest.raises(ConfigurationError, match="max_body_bytes must be at most"):
        ApiSettings(max_body_bytes=MAX_BODY_BYTES + 1)
