"""The host's check of the enclave's documents (signd.operations.attestation): a fresh
document verifies; a tampered, foreign, unpinned or replayed one does not, and says why."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from signd.attestation import SimulatedNsm, aws_nitro_root_certificate, load_dev_root, measure
from signd.attestation.document import PCR_SIZE
from signd.config import load_settings
from signd.errors import (
    ConfigurationError,
    DependencyUnavailable,
    UnsupportedOperation,
)
from signd.kms.server import ServerInfo, start_kms_server
from signd.operations.attestation import (
    AWS_NITRO_ROOT,
    DEV_ROOT,
    AttestationInvalid,
    AttestationNotConfigured,
    EnclaveAttestor,
    KmsServerPin,
    TrustAnchor,
    enclave_attestor,
    pcr0_pins,
)
from signd.operations.backends import build_signer
from signd.operations.local_kms import attested_key_policy, ensure_data_key_alias
from tests.attestation.tampering import tamper

OTHER_PCR = b"\x5a" * PCR_SIZE


@pytest.fixture
def provider(ca_directory: Path) -> SimulatedNsm:
    return SimulatedNsm(ca_directory)


@pytest.fixture
def anchor(provider: SimulatedNsm, ca_directory: Path) -> TrustAnchor:
    return TrustAnchor(DEV_ROOT, lambda: load_dev_root(ca_directory))


def honest(provider: SimulatedNsm) -> Callable[[bytes], bytes]:
    return lambda nonce: provider.attest(nonce=nonce)


def test_a_fresh_document_verifies(provider: SimulatedNsm, anchor: TrustAnchor) -> None:
    attested = EnclaveAttestor(honest(provider), anchor).attest(b"nonce")
    assert attested.verified and attested.problem is None
    assert attested.root == DEV_ROOT and attested.pinned_pcr0 == ()
    assert attested.payload.nonce == b"nonce"
    assert attested.payload.pcrs[0] == measure()[0]
    EnclaveAttestor(honest(provider), anchor).check()


def test_a_pinned_pcr0_that_matches_verifies(provider: SimulatedNsm, anchor: TrustAnchor) -> None:
    pins = (OTHER_PCR, provider.pcrs[0])
    attested = EnclaveAttestor(honest(provider), anchor, pinned_pcr0=lambda: pins).attest(b"n")
    assert attested.verified and attested.pinned_pcr0 == pins


def rejection(attestor: EnclaveAttestor) -> str:
    with pytest.raises(AttestationInvalid) as refused:
        attestor.check()
    assert refused.value.code == "attestation_invalid"
    return refused.value.message


def test_a_document_altered_after_signing_is_refused(
    provider: SimulatedNsm, anchor: TrustAnchor
) -> None:
    def forging(nonce: bytes) -> bytes:
        document = provider.attest(nonce=nonce)
        return tamper(document, pcrs={**provider.pcrs, 0: OTHER_PCR})

    attestor = EnclaveAttestor(forging, anchor)
    assert rejection(attestor) == "attestation: COSE signature does not verify"
    attested = attestor.attest(b"n")
    assert not attested.verified and attested.payload.pcrs[0] == OTHER_PCR


def test_a_document_from_another_root_is_refused(tmp_path: Path, anchor: TrustAnchor) -> None:
    stranger = SimulatedNsm(tmp_path / "another-dev-ca")
    message = rejection(EnclaveAttestor(honest(stranger), anchor))
    assert message == "attestation: cabundle[0] is not a trusted root certificate"
    nitro = TrustAnchor(AWS_NITRO_ROOT, aws_nitro_root_certificate)
    assert "not a trusted root" in rejection(EnclaveAttestor(honest(stranger), nitro))


def test_a_pcr0_kms_does_not_pin_is_refused(provider: SimulatedNsm, anchor: TrustAnchor) -> None:
    attestor = EnclaveAttestor(honest(provider), anchor, pinned_pcr0=lambda: (OTHER_PCR,))
    assert rejection(attestor) == "attestation: PCR0 is not the one KMS is pinned to"


def test_a_replayed_document_is_refused(provider: SimulatedNsm, anchor: TrustAnchor) -> None:
    recorded = provider.attest(nonce=b"an earlier nonce")
    assert rejection(EnclaveAttestor(lambda nonce: recorded, anchor)) == (
        "attestation: nonce does not match"
    )


def test_a_missing_dev_root_is_a_configuration_problem(
    provider: SimulatedNsm, tmp_path: Path
) -> None:
    anchor = TrustAnchor(DEV_ROOT, lambda: load_dev_root(tmp_path / "nowhere"))
    attested = EnclaveAttestor(honest(provider), anchor).attest(b"n")
    assert isinstance(attested.problem, ConfigurationError)
    assert "no development CA" in attested.problem.message


def test_garbage_is_an_unavailable_enclave(anchor: TrustAnchor) -> None:
    with pytest.raises(DependencyUnavailable, match="malformed attestation document"):
        EnclaveAttestor(lambda nonce: b"\xa0", anchor).attest(b"n")


def test_an_enclave_that_cannot_attest_is_not_configured(anchor: TrustAnchor) -> None:
    def refusing(nonce: bytes) -> bytes:
        raise UnsupportedOperation("unknown message type 7")

    with pytest.raises(AttestationNotConfigured, match="unknown message type 7") as refused:
        EnclaveAttestor(refusing, anchor).attest(b"n")
    assert refused.value.http_status == 404


def test_pcr0_pins_are_read_from_the_attested_key_policy() -> None:
    pcr0 = measure()[0]
    assert pcr0_pins(attested_key_policy(pcr0)) == (pcr0,)
    assert pcr0_pins(json.dumps({"Statement": []})) == ()
    assert pcr0_pins("not json") == ()


@pytest.fixture
def kms_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    with start_kms_server(home):
        yield home


def test_the_embedded_kms_server_pin_is_read_and_cached(kms_home: Path) -> None:
    now = [0.0]
    pin = KmsServerPin(kms_home, ttl=10, clock=lambda: now[0])
    assert pin() == ()  # no attested key yet
    client = ServerInfo.read(kms_home).client()
    ensure_data_key_alias(client, pcr0=OTHER_PCR)
    client.close()
    assert pin() == ()  # cached
    now[0] = 10.0
    assert pin() == (OTHER_PCR,)


def test_no_kms_server_means_no_pin(tmp_path: Path) -> None:
    assert KmsServerPin(tmp_path)() == ()


def write_config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "signd.toml").write_text(text)
    return home


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('[custody]\nenabled = ["keystore"]\n', None),
        ('[custody]\nenabled = ["enclave"]\n[enclave]\nattestation = "off"\n', None),
        ('[custody]\nenabled = ["enclave"]\n', DEV_ROOT),
        ('[custody]\nenabled = ["enclave"]\n[enclave]\nattestation = "nsm"\n', AWS_NITRO_ROOT),
        ('[custody]\nenabled = ["hsm"]\n[hsm]\nin_enclave = true\n', DEV_ROOT),
    ],
)
def test_the_attestor_follows_the_configuration(
    tmp_path: Path, config: str, expected: str | None
) -> None:
    settings = load_settings(write_config(tmp_path / "home", config))
    attestor = enclave_attestor(settings, build_signer(settings))
    assert (attestor.anchor.name if attestor is not None else None) == expected


def test_an_unknown_attestation_mode_is_refused(tmp_path: Path) -> None:
    config = '[custody]\nenabled = ["enclave"]\n[enclave]\nattestation = "maybe"\n'
    settings = load_settings(write_config(tmp_path / "home", config))
    with pytest.raises(ConfigurationError, match=r"enclave\.attestation"):
        enclave_attestor(settings, build_signer(settings))
