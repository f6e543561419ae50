"""Run a real enclave process for tests: ``python -m tests.enclave.enclave_process HOME SOCKET``."""

from __future__ import annotations

import sys
from pathlib import Path

from signd.enclave.server import run_enclave
from signd.kms.local import LocalKms
from signd.storage.blobs import FilesystemBlobStore


def main(argv: list[str]) -> None:
    home, socket_path = Path(argv[0]), argv[1]
    run_enclave("unix://" + socket_path, LocalKms(home), FilesystemBlobStore(home / "blobs"))


if __name__ == "__main__":
    main(sys.argv[1:])
