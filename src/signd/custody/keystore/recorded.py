"""The keystore as the metadata store records it, so that a missing file is not made anew.

A keystore's keys are kept in its file only: no key record, marker or log entry outside it
says they exist. So the metadata store (SQLite ``metadata.db`` or PostgreSQL) keeps one
:class:`~signd.storage.base.KeystoreRecord` per keystore path: which keystore it is (a digest
of its header's random salt) and how many keys it has been seen holding. It is written when a
keystore is created or opened, and after each write that adds keys, once they are committed,
so the count never exceeds what the right file holds.

With it, a keystore file that is missing (deleted, or on a volume that is not mounted) while
keys of it are recorded is not created anew, and a file that is another keystore, or an older
copy holding fewer keys than recorded, is not opened: each is refused with a message naming
the file and the count, until the right file is back. Only the count is recorded, not the
keys: which keys are missing is not said.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from signd.errors import DependencyUnavailable
from signd.storage.base import KeystoreRecord, MetadataStore

_NEW_KEYSTORE_HINT = "to start a new keystore instead, give it a new [keystore] path"


def keystore_location(path: Path) -> str:
    """The absolute path a keystore is recorded under (symbolic links are not followed: an
    unmounted volume must not change it)."""
    return os.path.abspath(path)


def refuse_if_keys_recorded(path: Path, metadata: MetadataStore) -> None:
    """Before a keystore is created at ``path``: refuse when keys of a keystore there are
    recorded, or when the metadata store cannot say (DependencyUnavailable)."""
    try:
        record = metadata.keystore_record(keystore_location(path))
    except DependencyUnavailable as exc:
        raise DependencyUnavailable(
            f"the keystore {path} is missing and the metadata store cannot say whether keys "
            f"of it are recorded, so none is created: {exc.message}"
        ) from None
    if record is not None and record.key_count > 0:
        raise DependencyUnavailable(
            f"the keystore {path} is missing, but {_keys(record.key_count)} of it "
            "are recorded in the metadata store: put the file back (or mount its volume). "
            f"signd does not create an empty keystore in its place; {_NEW_KEYSTORE_HINT}"
        )


def record_keystore(
    path: Path, keystore_id: str, count_held: Callable[[], int], metadata: MetadataStore
) -> None:
    """Record the keystore ``keystore_id`` at ``path`` as holding the keys ``count_held``
    counts; refuse it (DependencyUnavailable) when it is not the keystore recorded there, or
    holds fewer keys than recorded.

    The keys are counted again before a smaller count is taken for an older copy: another
    writer of the same file (a concurrent create, or ``signd keys new`` beside ``signd
    serve``) may have committed and recorded more keys between the count and the record."""
    held = count_held()
    try:
        record = metadata.record_keystore(
            KeystoreRecord(keystore_location(path), keystore_id, held)
        )
    except DependencyUnavailable as exc:
        raise DependencyUnavailable(
            f"the keystore {path} cannot be checked against the metadata store: {exc.message}"
        ) from None
    if record.keystore_id != keystore_id:
        raise DependencyUnavailable(
            f"{path} is not the keystore whose {_keys(record.key_count)} are recorded in the "
            f"metadata store: it is keystore {keystore_id[:12]} holding {_keys(held)}, and "
            f"keystore {record.keystore_id[:12]} is recorded at this path. Put that "
            f"keystore's file back; {_NEW_KEYSTORE_HINT}"
        )
    if record.key_count > held:
        held = count_held()
    if record.key_count > held:
        raise DependencyUnavailable(
            f"the keystore {path} holds {_keys(held)}, but {record.key_count} are recorded "
            "for it in the metadata store (is it an older copy?): put the latest copy back"
        )


def _keys(count: int) -> str:
    return f"{count} key" if count == 1 else f"{count} keys"
