from tests.gate.support import gated, hot_key  # noqa: F401
