"""The simulated NSM: same format, the development root, PCRs that measure the code."""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signd.attestation import (
    AttestationDocument,
    CoseSign1,
    SimulatedNsm,
    load_dev_root,
    measure,
    measurement,
    verify_attestation,
)
from signd.attestation.devca import LEAF_LIFETIME
from signd.errors import AccessDenied, ConfigurationError, InvalidField
from tests.attestation.conftest import ManualClock

MAX_AGE = timedelta(minutes=5)
CONFIG = b'{"policy": "test"}'


def _verify(
    nsm: SimulatedNsm,
    raw: bytes,
    clock: ManualClock,
    *,
    nonce: bytes | None = None,
    expected_pcrs: Mapping[int, bytes] | None = None,
) -> AttestationDocument:
    return verify_attestation(
        raw,
        root_certificates=[nsm.root_certificate],
        expected_pcrs=expected_pcrs,
        nonce=nonce,
        max_age=MAX_AGE,
        now=clock(),
    )


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the installed signd package to edit."""
    copy = tmp_path / "signd"
    shutil.copytree(
        measurement.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return copy


def test_round_trip_with_every_optional_field(nsm: SimulatedNsm, clock: ManualClock) -> None:
    raw = nsm.attest(user_data=b"request-hash", nonce=b"\x00" * 32, public_key=b"\x30\x59der")
    document = _verify(nsm, raw, clock, nonce=b"\x00" * 32, expected_pcrs=measure(CONFIG))
    assert document.user_data == b"request-hash"
    assert document.nonce == b"\x00" * 32
    assert document.public_key == b"\x30\x59der"
    assert document.module_id == nsm.module_id
    assert document.timestamp == clock().replace(microsecond=clock().microsecond // 1000 * 1000)


def test_absent_fields_stay_absent(nsm: SimulatedNsm, clock: ManualClock) -> None:
    document = _verify(nsm, nsm.attest(), clock)
    assert (document.user_data, document.nonce, document.public_key) == (None, None, None)


def test_empty_user_data_and_nonce_are_kept(nsm: SimulatedNsm, clock: ManualClock) -> None:
    document = _verify(nsm, nsm.attest(user_data=b"", nonce=b""), clock, nonce=b"")
    assert (document.user_data, document.nonce) == (b"", b"")


def test_documents_have_the_nitro_shape(nsm: SimulatedNsm, clock: ManualClock) -> None:
    raw = nsm.attest(nonce=b"n")
    envelope = CoseSign1.decode(raw)
    assert envelope.encode() == raw
    document = AttestationDocument.decode(envelope.payload)
    assert document.digest == "SHA384"
    assert sorted(document.pcrs) == list(range(16))
    assert all(document.pcrs[index] == bytes(48) for index in range(3, 16))
    assert {index: document.pcrs[index] for index in (0, 1, 2)} == measure(CONFIG)
    root_der = nsm.root_certificate.public_bytes(serialization.Encoding.DER)
    assert document.cabundle[0] == root_der
    assert len(document.cabundle) == 2
    leaf = x509.load_der_x509_certificate(document.certificate)
    assert leaf.issuer == x509.load_der_x509_certificate(document.cabundle[1]).subject


def test_simulated_documents_are_refused_with_the_aws_root(
    nsm: SimulatedNsm, clock: ManualClock, aws_root: x509.Certificate
) -> None:
    with pytest.raises(AccessDenied, match="not a trusted root"):
        verify_attestation(nsm.attest(), root_certificates=[aws_root], max_age=MAX_AGE, now=clock())


def test_another_dev_ca_is_not_trusted(
    nsm: SimulatedNsm, clock: ManualClock, tmp_path: Path
) -> None:
    other = SimulatedNsm(tmp_path / "other-ca", clock=clock)
    with pytest.raises(AccessDenied, match="not a trusted root"):
        verify_attestation(
            nsm.attest(), root_certificates=[other.root_certificate], max_age=MAX_AGE, now=clock()
        )


def test_freshness_and_pcr_checks_apply(nsm: SimulatedNsm, clock: ManualClock) -> None:
    raw = nsm.attest(nonce=b"one")
    with pytest.raises(AccessDenied, match="nonce does not match"):
        _verify(nsm, raw, clock, nonce=b"two")
    with pytest.raises(AccessDenied, match="PCR2 does not match"):
        _verify(nsm, raw, clock, expected_pcrs=measure(b"another config"))
    clock.advance(MAX_AGE + timedelta(milliseconds=1))
    with pytest.raises(AccessDenied, match="stale"):
        _verify(nsm, raw, clock)


def test_the_leaf_is_renewed_before_it_expires(nsm: SimulatedNsm, clock: ManualClock) -> None:
    first = AttestationDocument.decode(CoseSign1.decode(nsm.attest()).payload)
    clock.advance(LEAF_LIFETIME)
    raw = nsm.attest()
    second = AttestationDocument.decode(CoseSign1.decode(raw).payload)
    assert second.certificate != first.certificate
    assert _verify(nsm, raw, clock)


def test_each_boot_has_its_own_leaf_and_module_id(
    make_nsm: Callable[..., SimulatedNsm], clock: ManualClock
) -> None:
    first, second = make_nsm(), make_nsm()
    assert first.root_certificate == second.root_certificate
    assert first.module_id != second.module_id
    one = AttestationDocument.decode(CoseSign1.decode(first.attest()).payload)
    two = AttestationDocument.decode(CoseSign1.decode(second.attest()).payload)
    assert one.certificate != two.certificate
    assert one.cabundle == two.cabundle


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"user_data": bytes(1025)}, "user_data"),
        ({"nonce": bytes(1025)}, "nonce"),
        ({"public_key": bytes(1025)}, "public_key"),
        ({"public_key": b""}, "public_key"),
        ({"nonce": "text"}, "nonce"),
    ],
)
def test_attest_refuses_oversize_or_mistyped_fields(
    nsm: SimulatedNsm, kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(InvalidField, match=name):
        nsm.attest(**kwargs)  # type: ignore[arg-type]


# -- the development CA on disk ------------------------------------------------------------


def test_ca_files_are_private_and_reused(
    nsm: SimulatedNsm, ca_directory: Path, make_nsm: Callable[..., SimulatedNsm]
) -> None:
    assert stat.S_IMODE(ca_directory.stat().st_mode) == 0o700
    for key in ("root.key", "intermediate.key"):
        assert stat.S_IMODE((ca_directory / key).stat().st_mode) == 0o600
    assert load_dev_root(ca_directory) == nsm.root_certificate
    assert make_nsm().root_certificate == nsm.root_certificate


def test_a_readable_ca_key_is_refused(
    nsm: SimulatedNsm, ca_directory: Path, make_nsm: Callable[..., SimulatedNsm]
) -> None:
    os.chmod(ca_directory / "intermediate.key", 0o644)
    with pytest.raises(ConfigurationError, match="mode 0600"):
        make_nsm()


def test_a_ca_key_that_does_not_match_is_refused(
    nsm: SimulatedNsm, ca_directory: Path, make_nsm: Callable[..., SimulatedNsm]
) -> None:
    shutil.copy(ca_directory / "root.key", ca_directory / "intermediate.key")
    with pytest.raises(ConfigurationError, match="does not match"):
        make_nsm()


def test_load_dev_root_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no development CA"):
        load_dev_root(tmp_path)


# -- measurements --------------------------------------------------------------------------


def test_measure_is_stable_and_shaped(package_copy: Path) -> None:
    pcrs = measure(CONFIG, package_root=package_copy)
    assert sorted(pcrs) == [0, 1, 2]
    assert all(len(value) == 48 for value in pcrs.values())
    assert len(set(pcrs.values())) == 3
    assert measure(CONFIG, package_root=package_copy) == pcrs
    assert pcrs == measure(CONFIG)


def _pcr0(root: Path) -> bytes:
    return measure(package_root=root)[0]


@pytest.mark.parametrize("relative", ["crypto/hashing.py", "errors.py", "attestation/verify.py"])
def test_pcr0_changes_when_measured_code_changes(package_copy: Path, relative: str) -> None:
    before = _pcr0(package_copy)
    path = package_copy / relative
    path.write_bytes(path.read_bytes() + b"\n# changed\n")
    assert _pcr0(package_copy) != before


def test_pcr0_changes_when_a_measured_file_is_added_or_renamed(package_copy: Path) -> None:
    before = _pcr0(package_copy)
    (package_copy / "crypto" / "extra.py").write_bytes(b"")
    added = _pcr0(package_copy)
    assert added != before
    (package_copy / "crypto" / "extra.py").rename(package_copy / "crypto" / "other.py")
    assert _pcr0(package_copy) not in (before, added)


def test_pcr0_ignores_unmeasured_code_and_bytecode(package_copy: Path) -> None:
    before = _pcr0(package_copy)
    (package_copy / "cli" / "main.py").write_text("# the host side may change freely\n")
    cache = package_copy / "crypto" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "hashing.cpython-311.pyc").write_bytes(b"bytecode")
    assert _pcr0(package_copy) == before


def test_simulated_nsm_reports_the_measured_tree(
    package_copy: Path, make_nsm: Callable[..., SimulatedNsm]
) -> None:
    (package_copy / "kms" / "base.py").write_text("# a different enclave\n")
    nsm = make_nsm(package_root=package_copy)
    assert nsm.pcrs[0] == _pcr0(package_copy) != measure()[0]


def test_pcr1_follows_dependency_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    before = measurement.measure_runtime()
    real_version = metadata.version

    def bumped(distribution: str) -> str:
        return "999.0" if distribution == "cbor2" else real_version(distribution)

    monkeypatch.setattr(metadata, "version", bumped)
    assert "cbor2 999.0" in measurement.runtime_description()
    assert measurement.measure_runtime() != before


def test_pcr2_follows_the_configuration() -> None:
    assert measure(b"a")[2] != measure(b"b")[2]
    assert measure(b"a")[0] == measure(b"b")[0]


def test_pcr0_measures_every_package_the_import_contract_calls_trusted() -> None:
    """The packages that run in the enclave and decide there (pyproject's import contract
    "trusted modules (they run in the enclave)") are all in PCR0: a gate, authentication or
    audit changed on the host's disk must not keep the PCR0 a key policy pins."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    [contract] = [
        contract
        for contract in pyproject["tool"]["importlinter"]["contracts"]
        if contract["name"].startswith("trusted modules")
    ]
    trusted = {module.removeprefix("signd.") for module in contract["source_modules"]}
    assert trusted <= set(measurement.MEASURED_PATHS)


@pytest.mark.parametrize("relative", ["gate/keeper.py", "auth/request_signing.py", "audit/log.py"])
def test_pcr0_changes_when_the_gate_changes(package_copy: Path, relative: str) -> None:
    before = _pcr0(package_copy)
    path = package_copy / relative
    path.write_bytes(path.read_bytes() + b"\n# changed\n")
    assert _pcr0(package_copy) != before
