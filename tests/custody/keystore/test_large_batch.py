"""A large batch: unique keys, progress reports, and a reopen that finds the last one.

Speed (keys/s, unlock time, signing ratio) is measured by `signd bench`, not asserted here.
"""

from __future__ import annotations

from pathlib import Path

from tests.custody.keystore.conftest import eth_address, open_keystore


def test_large_batch_is_unique_reports_progress_and_survives_reopen(keystore_path: Path) -> None:
    reported: list[int] = []
    with open_keystore(keystore_path) as keystore:
        keys = keystore.create_keys("ethereum", eth_address, count=10_000, progress=reported.append)
    assert len({k.address for k in keys}) == 10_000
    assert reported[-1] == 10_000
    assert reported == sorted(reported)
    assert 10 <= len(reported) <= 100
    with open_keystore(keystore_path, create=False) as keystore:
        assert keystore.find_key(keys[-1].address) == keys[-1]
        assert keystore.find_key(keys[0].key_id) == keys[0]
