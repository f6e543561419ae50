"""Freezing start-up objects: the collector then leaves them alone, and still collects
cycles made afterwards."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap


def test_freezing_start_up_objects_in_a_service_process() -> None:
    """Run in a child process: freezing is process-wide and lasts until exit."""
    program = textwrap.dedent(
        """
        import gc, weakref
        from signd.memory import OLDER_THRESHOLD, YOUNG_THRESHOLD, freeze_startup_objects

        made_at_start_up = [object() for _ in range(10)], {"policy": [1, 2, 3]}
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
        assert not any(obj is made_at_start_up for obj in gc.get_objects())

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after start-up
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert gc.get_freeze_count() == 0  # this process was left alone
