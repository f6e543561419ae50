"""`signd enclave` refuses bad cache settings with a clear error, not a traceback."""

from __future__ import annotations

import pytest

from tests.cli.conftest import Cli


@pytest.mark.parametrize(
    ("setting", "value"),
    [("cache_max_age", '"abc"'), ("cache_max_uses", "0"), ("cache_max_entries", "-5")],
)
def test_bad_cache_settings_are_configuration_errors(cli: Cli, setting: str, value: str) -> None:
    config = cli.home / "signd.toml"
    config.write_text(config.read_text() + f"\n[enclave]\n{setting} = {value}\n")
    result = cli.run("enclave", "--listen", f"unix://{cli.home}/e.sock", ok=False)
    output = result.output if hasattr(result, "output") else str(result)
    assert f"enclave.{setting} must be a positive number" in output
    assert "Traceback" not in output
