"""Enclave attestation: Nitro attestation documents, where they come from, and their verifier.

- :mod:`~signd.attestation.document`: the COSE_Sign1 envelope and the document, parsed strictly.
- :mod:`~signd.attestation.verify`: :func:`verify_attestation`, the one verifier for real and
  simulated documents (chain to a configured root, ES384 signature, freshness, PCRs).
- :mod:`~signd.attestation.providers`: :class:`NsmProvider` (``/dev/nsm``) and
  :class:`SimulatedNsm` (a local development CA, PCRs from :func:`measure`).
"""

from signd.attestation.devca import load_dev_root
from signd.attestation.document import AttestationDocument, CoseSign1
from signd.attestation.measurement import MEASURED_PATHS, measure
from signd.attestation.providers import AttestationProvider, NsmProvider, SimulatedNsm
from signd.attestation.verify import (
    aws_nitro_root_certificate,
    load_root_certificates,
    verify_attestation,
)

__all__ = [
    "MEASURED_PATHS",
    "AttestationDocument",
    "AttestationProvider",
    "CoseSign1",
    "NsmProvider",
    "SimulatedNsm",
    "aws_nitro_root_certificate",
    "load_dev_root",
    "load_root_certificates",
    "measure",
    "verify_attestation",
]
