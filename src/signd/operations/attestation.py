"""The host's check of the enclave's attestation: fetch a fresh document, verify it, report.

:class:`EnclaveAttestor` asks the enclave (an ATTESTATION request) for a document binding a
nonce and verifies it as an outside verifier would, with
:func:`signd.attestation.verify_attestation`:

- against the configured trust anchor: the AWS Nitro root (``[enclave] attestation = "nsm"``,
  named ``aws-nitro``) or the simulated NSM's development root (``"simulated"``,
  ``[enclave] dev_ca``/root.pem, named ``signd-dev``);
- the nonce echoed, the timestamp within :data:`MAX_AGE` of the host's clock;
- PCR0 among the values the KMS key policy pins, when they are known: the embedded
  kms-server's ``alias/signd-enclave`` (pinned on first use, changed by ``signd kms repin``),
  read by :class:`KmsServerPin`. Under AWS KMS the host has no pin to compare with.

``GET /v1/attestation`` answers the document with this verdict, and ``/readyz`` is ready only
when a document for a random nonce verifies. The host is outside the trust boundary, so its
verdict is a convenience and an operational check: whoever relies on the enclave verifies the
document itself.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509

from signd.attestation import (
    AttestationDocument,
    CoseSign1,
    aws_nitro_root_certificate,
    load_dev_root,
    verify_attestation,
)
from signd.config import Settings, attestation_mode, expand_home
from signd.custody.enclave import EnclaveBackend
from signd.custody.hsm.settings import hsm_in_enclave
from signd.enclave.protocol import MAX_ATTESTATION_NONCE
from signd.errors import (
    AccessDenied,
    ConfigurationError,
    DependencyUnavailable,
    InvalidField,
    SigndError,
    UnsupportedOperation,
)
from signd.kms.server import INFO_FILE, KeyPolicy, ServerInfo
from signd.kms.server.errors import KmsApiError
from signd.kms.server.http import DEFAULT_DEV_CA, answers
from signd.kms.server.policy import POLICY_NAME, RECIPIENT_PCR_PREFIX
from signd.operations.components import EMBEDDED_KMS_TYPE, LEGACY_LOCAL_KEY
from signd.operations.local_kms import ATTESTED_ALIAS
from signd.operations.signer import Signer

logger = logging.getLogger(__name__)

AWS_NITRO_ROOT: Final = "aws-nitro"
DEV_ROOT: Final = "signd-dev"
MAX_AGE: Final = timedelta(minutes=5)
"""How far a document's timestamp may be from the host's clock (what KMS accepts)."""
PIN_CACHE_SECONDS: Final = 30.0
_PCR0_CONDITION: Final = f"{RECIPIENT_PCR_PREFIX}0".lower()
_PIN_BOTO_CONFIG: Final = Config(
    connect_timeout=1.0, read_timeout=2.0, retries={"total_max_attempts": 1, "mode": "standard"}
)


class AttestationNotConfigured(SigndError):
    """This service has no enclave that attests: no enclave custody, attestation switched off,
    or an enclave that does not know the ATTESTATION request."""

    code = "attestation_not_configured"
    http_status = 404


class AttestationInvalid(DependencyUnavailable):
    """A document the enclave sent does not verify: the enclave cannot be trusted now."""

    code = "attestation_invalid"


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """The root documents must chain to, by name; loaded when a document is checked (the
    simulated NSM creates the development root when it first starts)."""

    name: str
    load: Callable[[], x509.Certificate]


@dataclass(frozen=True, slots=True)
class Attestation:
    """A document the enclave sent, its parsed payload, and what the host found checking it."""

    document: bytes
    payload: AttestationDocument
    root: str
    """The name of the trust anchor it was checked against."""
    pinned_pcr0: tuple[bytes, ...]
    """The PCR0 values KMS pins, that the document's PCR0 was compared with (none known: ())."""
    problem: SigndError | None
    """Why it does not verify; ``None`` when it does."""

    @property
    def verified(self) -> bool:
        return self.problem is None


PcrPins = Callable[[], Sequence[bytes]]
"""Gives the PCR0 values KMS releases data keys to (empty: none known); never raises."""


def no_pins() -> Sequence[bytes]:
    return ()


class EnclaveAttestor:
    """Fetches fresh documents through ``fetch`` (nonce → document) and verifies them."""

    def __init__(
        self,
        fetch: Callable[[bytes], bytes],
        anchor: TrustAnchor,
        *,
        pinned_pcr0: PcrPins = no_pins,
        max_age: timedelta = MAX_AGE,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._fetch = fetch
        self.anchor = anchor
        self._pinned_pcr0 = pinned_pcr0
        self._max_age = max_age
        self._clock = clock

    def __repr__(self) -> str:
        return f"EnclaveAttestor(root={self.anchor.name!r})"

    def attest(self, nonce: bytes) -> Attestation:
        """A fresh document for ``nonce`` and its verdict.

        An enclave that does not attest raises AttestationNotConfigured; one that is down,
        DependencyUnavailable (also when what it sent is not an attestation document at all).
        """
        try:
            document = self._fetch(nonce)
        except UnsupportedOperation as exc:
            raise AttestationNotConfigured(exc.message) from None
        try:
            payload = AttestationDocument.decode(CoseSign1.decode(document).payload)
        except InvalidField as exc:
            raise DependencyUnavailable(
                f"the enclave sent a malformed attestation document ({exc.message})"
            ) from None
        pins = tuple(self._pinned_pcr0())
        problem: SigndError | None = None
        try:
            verify_attestation(
                document,
                root_certificates=[self.anchor.load()],
                nonce=nonce,
                max_age=self._max_age,
                now=self._clock() if self._clock is not None else None,
            )
            pcr0 = payload.pcrs.get(0, b"")
            if pins and not any(hmac.compare_digest(pcr0, pin) for pin in pins):
                raise AccessDenied("attestation: PCR0 is not the one KMS is pinned to")
        except ConfigurationError as exc:
            problem = exc
        except (AccessDenied, InvalidField) as exc:
            problem = AttestationInvalid(exc.message)
        return Attestation(document, payload, self.anchor.name, pins, problem)

    def check(self) -> None:
        """Raise unless a document for a random nonce verifies (the readiness check)."""
        problem = self.attest(secrets.token_bytes(MAX_ATTESTATION_NONCE // 2)).problem
        if problem is not None:
            raise problem


def pcr0_pins(policy: str) -> tuple[bytes, ...]:
    """The PCR0 values a key policy's ``kms:RecipientAttestation:PCR0`` conditions name."""
    try:
        statements = KeyPolicy.parse(policy).statements
    except KmsApiError:
        return ()
    pins: set[bytes] = set()
    for statement in statements:
        for condition in statement.conditions:
            if condition.key != _PCR0_CONDITION:
                continue
            for value in condition.values:
                try:
                    pins.add(bytes.fromhex(value))
                except ValueError:
                    continue
    return tuple(sorted(pins))


class KmsServerPin:
    """The PCR0 the home's embedded kms-server pins for ``alias/signd-enclave``, cached for
    ``ttl`` seconds. Unknown (no server running, no attested key yet, an error): ()."""

    def __init__(
        self,
        home: Path,
        *,
        ttl: float = PIN_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._home = home
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, tuple[bytes, ...]] | None = None

    def __repr__(self) -> str:
        return f"KmsServerPin(home={str(self._home)!r})"

    def __call__(self) -> tuple[bytes, ...]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= self._ttl:
                self._cached = (now, self._read())
            return self._cached[1]

    def _read(self) -> tuple[bytes, ...]:
        if not (self._home / INFO_FILE).exists():
            return ()
        try:
            info = ServerInfo.read(self._home)
        except ConfigurationError:
            return ()
        if not answers(info.endpoint):
            return ()
        client = info.client(config=_PIN_BOTO_CONFIG)
        try:
            key_arn = client.describe_key(KeyId=ATTESTED_ALIAS)["KeyMetadata"]["Arn"]
            policy = client.get_key_policy(KeyId=key_arn, PolicyName=POLICY_NAME)["Policy"]
        except client.exceptions.NotFoundException:
            return ()
        except (BotoCoreError, ClientError) as exc:
            reason = type(exc).__name__
            logger.warning("cannot read the KMS PCR0 pin: %s", reason)  # safe: a class name
            return ()
        finally:
            client.close()
        return pcr0_pins(str(policy))


def _uses_embedded_kms(settings: Settings) -> bool:
    """Whether the enclave's KMS is the home's kms-server (as ``build_kms`` decides)."""
    section = settings.section("kms")
    if section:
        return str(section.get("type", "local")) == EMBEDDED_KMS_TYPE
    return not (settings.home / LEGACY_LOCAL_KEY).exists()


def enclave_attestor(settings: Settings, signer: Signer) -> EnclaveAttestor | None:
    """The attestation check of the enclave ``signer`` reaches, per ``[enclave] attestation``;
    ``None`` when no configured custody runs in the enclave, or attestation is ``"off"``."""
    mode = attestation_mode(settings)
    in_enclave = [
        custody
        for custody in signer.custody_types
        if custody == "enclave" or (custody == "hsm" and hsm_in_enclave(settings.section("hsm")))
    ]
    if mode == "off" or not in_enclave:
        return None
    custody = in_enclave[0]

    def fetch(nonce: bytes) -> bytes:
        backend = signer.backend(custody)
        if not isinstance(backend, EnclaveBackend):
            raise ConfigurationError(f"custody {custody} does not run in the enclave")
        return backend.attestation(nonce)

    if mode == "nsm":
        anchor = TrustAnchor(AWS_NITRO_ROOT, aws_nitro_root_certificate)
    else:
        configured = settings.section("enclave").get("dev_ca")
        dev_ca = (
            Path(expand_home(str(configured), settings.home))
            if configured is not None
            else settings.home / DEFAULT_DEV_CA
        )
        anchor = TrustAnchor(DEV_ROOT, lambda: load_dev_root(dev_ca))
    pins: PcrPins = KmsServerPin(settings.home) if _uses_embedded_kms(settings) else no_pins
    return EnclaveAttestor(fetch, anchor, pinned_pcr0=pins)
