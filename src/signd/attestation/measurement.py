"""What the simulated NSM's PCRs measure, so local documents speak about the code that runs.

On Nitro, PCR0/1/2 hash the enclave image, its kernel and its application. Locally:

- **PCR0**, the enclave code: SHA-384 over every file under :data:`MEASURED_PATHS` of the
  ``signd`` package, sorted by relative POSIX path, each framed as
  ``len(path) ‖ path ‖ len(content) ‖ content`` (8-byte big-endian lengths); ``__pycache__``
  and compiled files are skipped.
- **PCR1**, the runtime: SHA-384 over one line per component, ``python <impl> <version>`` and
  ``<distribution> <version>`` for each of :data:`RUNTIME_DISTRIBUTIONS` (``absent`` if not
  installed).
- **PCR2**, the configuration: SHA-384 of the configuration bytes the enclave was started with.
"""

from __future__ import annotations

import hashlib
import platform
import struct
from importlib import metadata
from pathlib import Path
from typing import Final

from signd.errors import ConfigurationError

MEASURED_PATHS: Final = (
    "__init__.py",
    "errors.py",
    "files.py",
    "hardening.py",
    "memory.py",
    "secrets.py",
    "attestation",
    "audit",
    "auth",
    "chains",
    "crypto",
    "enclave",
    "gate",
    "kms",
    "policy",
)
"""The enclave side of the ``signd`` package, relative to its root; a missing entry adds nothing.
It holds every package the import contract calls trusted (they run in the enclave: the gate
authenticates, decides and audits there), so that a change to any of them changes PCR0."""

RUNTIME_DISTRIBUTIONS: Final = ("cbor2", "coincurve", "cryptography", "pycryptodome", "rlp")
"""The third-party distributions the enclave code imports."""

PACKAGE_ROOT: Final = Path(__file__).resolve().parents[1]
_SKIPPED_SUFFIXES: Final = frozenset({".pyc", ".pyo"})
_LENGTH: Final = struct.Struct(">Q")


def measured_files(package_root: Path = PACKAGE_ROOT) -> list[Path]:
    """The files PCR0 covers, sorted by their path relative to ``package_root``."""
    files: list[Path] = []
    for entry in MEASURED_PATHS:
        path = package_root / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files.extend(
            candidate
            for candidate in candidates
            if candidate.is_file()
            and "__pycache__" not in candidate.relative_to(package_root).parts
            and candidate.suffix not in _SKIPPED_SUFFIXES
        )
    return sorted(files, key=lambda file: file.relative_to(package_root).as_posix())


def measure_code(package_root: Path = PACKAGE_ROOT) -> bytes:
    """PCR0: the hash of the enclave code under ``package_root``."""
    digest = hashlib.sha384()
    for file in measured_files(package_root):
        name = file.relative_to(package_root).as_posix().encode()
        try:
            content = file.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"attestation: cannot read {name.decode()}: {exc}") from None
        for part in (name, content):
            digest.update(_LENGTH.pack(len(part)))
            digest.update(part)
    return digest.digest()


def runtime_description() -> str:
    """The text PCR1 hashes: the interpreter and each enclave dependency, one per line."""
    lines = [f"python {platform.python_implementation()} {platform.python_version()}"]
    for distribution in RUNTIME_DISTRIBUTIONS:
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            version = "absent"
        lines.append(f"{distribution} {version}")
    return "\n".join(lines) + "\n"


def measure_runtime() -> bytes:
    """PCR1: the hash of :func:`runtime_description`."""
    return hashlib.sha384(runtime_description().encode()).digest()


def measure_config(config: bytes) -> bytes:
    """PCR2: the hash of the enclave configuration bytes."""
    return hashlib.sha384(config).digest()


def measure(config: bytes = b"", *, package_root: Path = PACKAGE_ROOT) -> dict[int, bytes]:
    """PCR0, PCR1 and PCR2 of the enclave as :class:`~signd.attestation.SimulatedNsm` reports
    them; what ``signd enclave measure`` prints and key policies pin."""
    return {0: measure_code(package_root), 1: measure_runtime(), 2: measure_config(config)}
