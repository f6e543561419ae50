from tests.gate.support import gate_mode, gated, hot_key  # noqa: F401
