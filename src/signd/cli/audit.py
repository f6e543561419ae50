"""``signd audit verify``: check the audit log's hash chain and MACs.

With the enclave's gate the MAC key exists only in the enclave (the host keeps its KMS
ciphertext, ``HOME/audit.key.sealed``), so the log is verified there: streamed to it in
chunks with the key's ciphertext, which the enclave unwraps for verification only (the files
and chain in force there stay as they are), it reports the first bad record, and a log that
ends before the chain head of an enclave that seals with that key (a shared ``[enclave]
transport``; ``truncation_checked`` says whether it did). With the in-process gate, or
``--key``, the MAC key file (``HOME/audit.key``) is read here and every problem is reported
(the log read twice). Removed, reordered, altered and
inserted records are reported with their position, and the exit status is 1. Either way the
log is read a block at a time (:class:`~signd.audit.lines.LogLines`), so the memory used does
not grow with it.

Either way the report says which policy and clients files the verified records name, from
which record on (``policies``): each reload that changed a file starts a new run, and
records sealed before records named them make a first run of their own (``null``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from signd.cli.context import state
from signd.cli.output import emit, handles_errors, stdout
from signd.errors import IntegrityError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from signd.audit.lines import LogLines
    from signd.gate import GatePaths

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
    from signd.audit.lines import LogLines
    from signd.enclave.gate import MAX_LINE_SIZE
    from signd.gate import GatePaths

    settings = state.settings
    section = settings.section("api")
    paths = GatePaths.under(
        settings.home,
        clients_file=section.get("clients_file"),
        policy_file=section.get("policy_file"),
        audit_log=section.get("audit_log"),
    )
    log_path = log or paths.audit_log
    try:
        file = open(log_path, "rb")  # noqa: SIM115 (closed below, once verified)
    except OSError as exc:
        raise IntegrityError(f"cannot read the audit log {log_path}: {exc.strerror}") from None
    with file:
        lines = LogLines(file, max_size=MAX_LINE_SIZE)
        if key is None and paths.sealed_audit_key_file.exists():
            result = _verify_in_enclave(paths, lines)
        else:
            result = _verify_here(key or paths.audit_key_file, lines)
    result = {"log": str(log_path), **result}
    problems: list[dict[str, object]] = result["problems"]

    def human() -> None:
        if not problems:
            head = result["head"]
            stdout.print(
                f"audit log {log_path}: OK, {result['records']} records, "
                f"head seq {head['seq']} hash {head['hash']} (verified {result['where']})",
                markup=False,
            )
            if result["where"] == "in the enclave" and not result["truncation_checked"]:
                stdout.print(
                    "  records cut off the log's end are not detected: the enclave reached "
                    "does not seal this log (only the enclave of the service writing it can tell)",
                    markup=False,
                )
        else:
            stdout.print(f"audit log {log_path}: {len(problems)} problem(s)", markup=False)
        for problem in problems:
            where = (
                f"line {problem['line']}"
                if "line" in problem
                else f"record #{problem['position']} (seq {problem['seq']})"
            )
            stdout.print(f"  {problem['kind']}: {where}: {problem['detail']}", markup=False)
        _print_policies(result["policies"], verified=not problems)

    emit(result, as_json=as_json, human=human)
    if problems:
        raise typer.Exit(1)


def _print_policies(policies: list[dict[str, Any]], *, verified: bool) -> None:
    """The configurations the records name, one line per run."""
    if not policies:
        return
    which = "the records" if verified else "the records that verify"
    stdout.print(f"policy in force, as {which} name it:", markup=False)
    for run in policies:
        if run["policy_sha256"] is None and run["clients_sha256"] is None:
            named = "not named (records sealed before records named their policy)"
        else:
            named = f"policy sha256 {run['policy_sha256']}, clients sha256 {run['clients_sha256']}"
        stdout.print(f"  from record {run['from_seq']}: {named}", markup=False)


def _verify_here(key_file: Path, lines: LogLines) -> dict[str, Any]:
    """Every problem, found with the MAC key file (the log read twice, a line at a time)."""
    from signd.audit import SealedAuditRecord, verify_chain
    from signd.gate import load_mac_key

    mac_key = load_mac_key(key_file)
    unreadable: list[dict[str, object]] = []

    def records() -> Iterator[SealedAuditRecord]:
        unreadable.clear()
        for number, line in enumerate(lines, start=1):
            if len(line) > lines.max_size:
                detail = f"the line is longer than any audit record ({lines.max_size})"
                unreadable.append({"line": number, "kind": "unreadable", "detail": detail})
                continue
            try:
                yield SealedAuditRecord.from_json(line)
            except IntegrityError as exc:
                unreadable.append({"line": number, "kind": "unreadable", "detail": exc.message})

    report = verify_chain(records, mac_key)
    problems = unreadable + [
        {"position": p.position, "seq": p.seq, "kind": str(p.kind), "detail": p.detail}
        for p in report.problems
    ]
    return {
        "where": "with the MAC key file",
        "ok": not problems,
        "truncation_checked": False,
        "records": report.records,
        "head": {"seq": report.head.seq, "hash": report.head.hash.hex()},
        "problems": problems,
        "policies": [run.to_dict() for run in report.policies],
    }


def _verify_in_enclave(paths: GatePaths, lines: LogLines) -> dict[str, Any]:
    """The first problem, found by the enclave (which holds the MAC key)."""
    from signd.api.enclave_gatekeeper import verify_in_enclave
    from signd.custody.enclave import EnclaveBackend
    from signd.errors import ConfigurationError

    backend = state.signer.backend("enclave")
    if not isinstance(backend, EnclaveBackend):
        raise ConfigurationError("the audit key is sealed for the enclave, but no enclave custody")
    found = verify_in_enclave(backend.client, paths, lines)
    problems = [] if found.problem is None else [dict(found.problem)]
    return {
        "where": "in the enclave",
        "ok": not problems,
        "truncation_checked": found.against_chain_head,
        "records": found.records,
        "head": {"seq": found.head_seq, "hash": found.head_hash.hex()},
        "problems": problems,
        "policies": [run.to_dict() for run in found.policies],
    }
