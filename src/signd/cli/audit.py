"""``signd audit verify``: check the audit log's hash chain and MACs.

The MAC key is the one the service keeps (``HOME/audit.key``, created on its first run; in
the enclave follow-up it lives in the enclave, sealed by KMS, and verification runs there or
with a key released to auditors). Removed, reordered, altered and inserted records are
reported with their position, and the exit status is 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from signd.cli.context import state
from signd.cli.output import emit, handles_errors, stdout
from signd.errors import IntegrityError

audit_app = typer.Typer(
    help="The audit log of key creations and signing decisions.", no_args_is_help=True
)


@audit_app.command("verify")
@handles_errors
def audit_verify(
    log: Annotated[
        Path | None, typer.Option("--log", help="Audit log (default [api] audit_log).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="Audit MAC key file (default HOME/audit.key).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Verify the hash chain and MACs of the audit log; exit 1 on any problem."""
    from signd.audit import SealedAuditRecord, verify_chain
    from signd.gate import GatePaths, load_mac_key

    settings = state.settings
    paths = GatePaths.under(settings.home, audit_log=settings.section("api").get("audit_log"))
    log_path = log or paths.audit_log
    mac_key = load_mac_key(key or paths.audit_key_file)
    records = []
    unreadable: list[dict[str, object]] = []
    try:
        lines = log_path.read_bytes().splitlines()
    except OSError as exc:
        raise IntegrityError(f"cannot read the audit log {log_path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        try:
            records.append(SealedAuditRecord.from_json(line))
        except IntegrityError as exc:
            unreadable.append({"line": number, "kind": "unreadable", "detail": exc.message})
    report = verify_chain(records, mac_key)
    problems = unreadable + [
        {"position": p.position, "seq": p.seq, "kind": str(p.kind), "detail": p.detail}
        for p in report.problems
    ]
    result = {
        "log": str(log_path),
        "ok": not problems,
        "records": report.records,
        "head": {"seq": report.head.seq, "hash": report.head.hash.hex()},
        "problems": problems,
    }

    def human() -> None:
        if not problems:
            stdout.print(
                f"audit log {log_path}: OK, {report.records} records, "
                f"head seq {report.head.seq} hash {report.head.hash.hex()}",
                markup=False,
            )
            return
        stdout.print(f"audit log {log_path}: {len(problems)} problem(s)", markup=False)
        for problem in problems:
            where = (
                f"line {problem['line']}"
                if "line" in problem
                else f"record #{problem['position']} (seq {problem['seq']})"
            )
            stdout.print(f"  {problem['kind']}: {where}: {problem['detail']}", markup=False)

    emit(result, as_json=as_json, human=human)
    if problems:
        raise typer.Exit(1)
