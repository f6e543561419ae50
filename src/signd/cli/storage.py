"""``signd storage check``: enclave custody's key records against the blobs they name.

Lists and stats only: no blob is read or unsealed, so the command needs no KMS and no
enclave, just the ``[metadata]`` and ``[blobs]`` configuration. Exit status:

- 0: every record's range is stored, and no blob is an orphan (or all orphans were moved to
  the quarantine);
- 1: KEY LOSS, some record names a blob that is missing or too short (or a bad reference);
- 3: orphans only (harmless sealed ciphertext no record names);
- 4: the check could not run or finish (a store down, a bad setting), with the error.

No blob is ever deleted: ``--quarantine-orphans`` moves orphans to the blob store's
quarantine, and purging it is an operator's deliberate step (docs/ENCLAVE.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from signd.cli.context import state
from signd.cli.output import emit, exits_on_errors, print_error, stdout

if TYPE_CHECKING:
    from signd.operations.storage_check import QuarantineRun, StorageReport

storage_app = typer.Typer(
    help="Enclave custody's storage: key records and the sealed blobs they name.",
    no_args_is_help=True,
)

EXIT_CONSISTENT: Final = 0
EXIT_KEYS_LOST: Final = 1
EXIT_ORPHANS: Final = 3
EXIT_UNCHECKED: Final = 4


@storage_app.command("check")
@exits_on_errors(EXIT_UNCHECKED)
def storage_check(
    quarantine_orphans: Annotated[
        bool,
        typer.Option(
            "--quarantine-orphans",
            help="Move blobs no record names that are older than --older-than to the blob"
            " store's quarantine (each checked again just before its move). Nothing is"
            " deleted: purging the quarantine is a step for an operator.",
        ),
    ] = False,
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than",
            metavar="SECONDS",
            help="With --quarantine-orphans: move only orphans at least this old (600 or more).",
        ),
    ] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Find lost keys (a record whose blob is missing or short) and orphan blobs.

    Exit status: 0 consistent, 1 KEY LOSS, 3 orphans only, 4 the check could not run.
    """
    from signd.operations.components import build_blob_store, build_metadata_store
    from signd.operations.storage_check import check_orphan_age, check_storage
    from signd.operations.storage_check import quarantine_orphans as move_orphans

    check_orphan_age(older_than)
    settings = state.settings
    metadata = build_metadata_store(settings)
    try:
        blobs = build_blob_store(settings)
        try:
            report = check_storage(metadata, blobs)
            moves = (
                move_orphans(report, metadata, blobs, older_than=older_than)
                if quarantine_orphans
                else None
            )
        finally:
            blobs.close()
    finally:
        metadata.close()
    result = _result(report, moves)
    emit(result, as_json=as_json, human=lambda: _print_report(report, moves, older_than))
    if moves is not None and moves.error is not None and not as_json:
        print_error(moves.error, as_json=False)
    raise typer.Exit(_exit_status(report, moves))


def _remaining_orphans(report: StorageReport, moves: QuarantineRun | None) -> int:
    if moves is None:
        return len(report.orphans)
    return sum(outcome.action not in ("quarantined", "gone") for outcome in moves.outcomes)


def _exit_status(report: StorageReport, moves: QuarantineRun | None) -> int:
    if report.lost:
        return EXIT_KEYS_LOST
    if moves is not None and moves.error is not None:
        return EXIT_UNCHECKED
    return EXIT_ORPHANS if _remaining_orphans(report, moves) else EXIT_CONSISTENT


def _result(report: StorageReport, moves: QuarantineRun | None) -> dict[str, Any]:
    orphans = [orphan.to_dict() for orphan in report.orphans]
    if moves is not None:
        for orphan, outcome in zip(orphans, moves.outcomes, strict=True):
            orphan.update(outcome.to_dict())  # the same name, with action and moved_to
    result: dict[str, Any] = {
        "ok": not report.lost and not _remaining_orphans(report, moves),
        "checked_at": report.checked_at.isoformat(),
        "records": report.records,
        "blobs": report.blobs,
        "lost_keys": [lost.to_dict() for lost in report.lost],
        "orphans": orphans,
        "in_quarantine": report.in_quarantine.to_dict(),
    }
    if moves is not None:
        result["quarantined"] = moves.quarantined
        result["quarantine_refused"] = moves.refused
        result["quarantine_error"] = None if moves.error is None else moves.error.to_dict()
    return result


def _age(seconds: float) -> str:
    """``seconds`` for a person: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, hours, days = whole // 60, whole // 3600, whole // 86400
    if hours == 0:
        return f"{minutes} min"
    if days == 0:
        return f"{hours} h" + (f" {minutes % 60} min" if minutes % 60 else "")
    return f"{days} d" + (f" {hours % 24} h" if hours % 24 else "")


def _print_report(report: StorageReport, moves: QuarantineRun | None, older_than: float) -> None:
    def line(text: str) -> None:
        stdout.print(text, markup=False)

    line(
        f"storage check: {report.records} enclave key records, {report.blobs} blobs named enclave-*"
    )
    if report.lost:
        line(f"KEY LOSS: {len(report.lost)} keys cannot sign, their sealed bytes are not stored:")
        for lost in report.lost:
            sizes = (
                f" (the blob holds {lost.blob_size} bytes, the range needs {lost.needed})"
                if lost.problem == "short"
                else ""
            )
            line(
                f"  {lost.problem:<9} key {lost.key_id} {lost.chain} {lost.address}"
                f" blob {lost.blob or '(none)'}{sizes}"
            )
    if report.orphans:
        line(
            f"orphans: {len(report.orphans)} blobs no record names (sealed ciphertext, harmless;"
            f" --quarantine-orphans moves those older than {_age(older_than)} to the"
            " quarantine):"
        )
        outcomes = moves.outcomes if moves else []
        for index, orphan in enumerate(report.orphans):
            action = ""
            if outcomes:
                moved = outcomes[index].moved_to
                action = f"  [{outcomes[index].action}{f' to {moved}' if moved else ''}]"
            line(
                f"  {orphan.name}  {orphan.size} bytes, written"
                f" {orphan.modified.isoformat(timespec='seconds')}, {_age(orphan.age)} ago{action}"
            )
    held = report.in_quarantine
    if held.blobs:
        line(
            f"in quarantine from earlier runs: {held.blobs} blobs, {held.size} bytes (purge by"
            " hand once checked, see docs/ENCLAVE.md)"
        )
    if moves is not None and moves.refused is not None:
        line(f"quarantining no orphan: {moves.refused}")
    elif moves is not None:
        line(f"quarantined {moves.quarantined} orphans")
    if report.lost:
        line(f"result: KEY LOSS ({len(report.lost)} keys)")
    elif moves is not None and moves.error is not None:
        line("result: incomplete, quarantining orphans stopped at a store failure")
    elif _remaining_orphans(report, moves):
        line(f"result: no key lost; {_remaining_orphans(report, moves)} orphans")
    else:
        line("result: consistent")
