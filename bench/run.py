"""Run signd's benchmarks: ``python bench/run.py [--quick] [--only NAME] [--json]``."""

import sys

from signd.cli.main import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="bench/run.py")
