"""The blob references of sealed keys, as the enclave makes them and the host records them.

A key's record names where its sealed bytes are: ``enclave-batch-<uuid>@<offset>+<length>``
(:class:`BlobRange`), a byte range of the batch blob its key was stored in, or, for keys
stored before batch blobs, ``enclave-<key_id>``, a whole single-key blob. Every name starts
with :data:`BLOB_PREFIX`.

The enclave parses a reference strictly before it reads anything; ``signd storage check``
parses records with the same code, so it calls unusable exactly the references the enclave
would refuse. Nothing here is secret, and nothing here reads a blob.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from signd.enclave.protocol import MAX_BATCH
from signd.enclave.sealing import MAX_SEALED_SIZE
from signd.errors import IntegrityError, InvalidField
from signd.storage.blobs import check_blob_name

BLOB_PREFIX: Final = "enclave-"
"""Every enclave blob's name starts so; ``enclave-<key_id>`` is a single-key blob of old."""
BATCH_BLOB_PREFIX: Final = f"{BLOB_PREFIX}batch-"
MAX_BATCH_BLOB_SIZE: Final = MAX_BATCH * MAX_SEALED_SIZE
"""No range of a batch blob ends beyond this: MAX_BATCH keys of at most MAX_SEALED_SIZE bytes."""

_RANGE: Final = re.compile(r"(0|[1-9][0-9]{0,9})\+([1-9][0-9]{0,9})", re.ASCII)
_MALFORMED: Final = "sealed key blob failed its integrity check"


@dataclass(frozen=True, slots=True)
class BlobRange:
    """``length`` bytes of the batch blob ``name`` from ``offset``: where one sealed key is."""

    name: str
    offset: int
    length: int

    def __str__(self) -> str:
        """The key's blob reference, ``<name>@<offset>+<length>``."""
        return f"{self.name}@{self.offset}+{self.length}"

    @property
    def end(self) -> int:
        """The size the batch blob must have at least for this range to be in it."""
        return self.offset + self.length

    @classmethod
    def parse(cls, reference: str) -> BlobRange | None:
        """The range a blob reference names; ``None`` for a plain (whole single-key) blob name.

        The host only stores and echoes back what the enclave made, so a malformed range means
        a corrupted or tampered record: IntegrityError, saying no more than a bad blob does.
        Digits are ASCII, without sign or leading zeros; the range lies within the largest
        batch blob and holds at most one sealed key; the name is a batch blob's.
        """
        name, at, span = reference.partition("@")
        if not at:
            return None
        match = _RANGE.fullmatch(span)
        if match is None or not name.startswith(BATCH_BLOB_PREFIX):
            raise IntegrityError(_MALFORMED)
        offset, length = int(match[1]), int(match[2])
        if length > MAX_SEALED_SIZE or offset + length > MAX_BATCH_BLOB_SIZE:
            raise IntegrityError(_MALFORMED)
        try:
            check_blob_name(name)
        except InvalidField:
            raise IntegrityError(_MALFORMED) from None
        return cls(name, offset, length)
