"""Output for humans (rich) and machines (``--json``), and the one place errors are printed."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from signd.errors import SigndError

P = ParamSpec("P")
R = TypeVar("R")

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def emit(data: dict[str, Any], *, as_json: bool, human: Callable[[], None] | None = None) -> None:
    """Print ``data`` as JSON, or call ``human`` to render it (JSON when there is none)."""
    if as_json or human is None:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        human()


def print_error(exc: SigndError, *, as_json: bool) -> None:
    """Print ``exc`` as a JSON error body (with ``--json``) or one line on stderr."""
    if as_json:
        sys.stdout.write(json.dumps({"error": exc.to_dict()}, indent=2) + "\n")
    else:
        where = f" ({escape(exc.field)})" if exc.field else ""
        stderr.print(f"[red]error[/red] {exc.code}{where}: {escape(exc.message)}", markup=True)


def exits_on_errors(status: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn a SigndError into a clean message (or a JSON error body) and exit ``status``."""

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return command(*args, **kwargs)
            except SigndError as exc:
                print_error(exc, as_json=bool(kwargs.get("as_json")))
                raise typer.Exit(status) from None

        return wrapper

    return decorate


handles_errors = exits_on_errors(1)
"""Turn a SigndError into a clean message (or a JSON error body) and exit status 1."""
