"""``python -m signd`` is the ``signd`` command."""

from signd.cli.main import app

app(prog_name="signd")
