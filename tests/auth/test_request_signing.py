"""Request signatures: round trips with both key kinds, and every refusal."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from signd.auth import (
    HEADER_CLIENT,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    ClientsRegistry,
    RequestVerifier,
    canonical_request,
    sign_request,
)
from signd.auth.request_signing import PrivateKey
from signd.errors import AccessDenied, InvalidField
from tests.auth.conftest import BEARER_TOKEN, NOW, FakeClock

BODY = b'{"to":"0x00","value":"1"}'
PATH = "/v1/keys/abc/sign?dry_run=0"


@pytest.fixture
def verifier(registry: ClientsRegistry, clock: FakeClock) -> RequestVerifier:
    return RequestVerifier(registry, window=300, now=clock, nonce_capacity=100, not_before=0)


@pytest.fixture(params=["ed25519", "p256"])
def signer(
    request: pytest.FixtureRequest,
    ed_key: ed25519.Ed25519PrivateKey,
    p256_key: ec.EllipticCurvePrivateKey,
) -> tuple[str, PrivateKey]:
    if request.param == "ed25519":
        return "wallet-hot", ed_key
    return "mobile", p256_key


def signed(signer: tuple[str, PrivateKey], *, now: float = NOW, **kw: object) -> dict[str, str]:
    client_id, key = signer
    return sign_request("POST", PATH, BODY, client_id, key, now=now, **kw)  # type: ignore[arg-type]


def test_canonical_string_is_exactly_the_documented_one() -> None:
    nonce = "00112233445566778899aabbccddeeff"
    expected = (
        "signd-request-v1\nPOST\n/v1/sign?x=1\n"
        + hashlib.sha256(b"body").hexdigest()
        + "\n1700000000\n"
        + nonce
    )
    assert canonical_request("POST", "/v1/sign?x=1", b"body", "1700000000", nonce) == (
        expected.encode()
    )


@pytest.mark.parametrize(
    ("method", "path", "timestamp", "nonce"),
    [
        ("post", "/a", "1", "00" * 16),
        ("POST", "a", "1", "00" * 16),
        ("POST", "/a\nb", "1", "00" * 16),
        ("POST", "/a b", "1", "00" * 16),
        ("POST", "/a", "-1", "00" * 16),
        ("POST", "/a", "1.5", "00" * 16),
        ("POST", "/a", "1", "00" * 15),
        ("POST", "/a", "1", "AA" * 16),
        ("POST", "/a", "1", "00" * 65),
        ("POST", "/a", "1", "0" * 33),
    ],
)
def test_canonical_string_refuses_ambiguous_fields(
    method: str, path: str, timestamp: str, nonce: str
) -> None:
    with pytest.raises(InvalidField):
        canonical_request(method, path, b"", timestamp, nonce)


def test_signed_request_verifies(verifier: RequestVerifier, signer: tuple[str, PrivateKey]) -> None:
    headers = signed(signer)
    assert set(headers) == {HEADER_CLIENT, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE}
    assert len(bytes.fromhex(headers[HEADER_NONCE])) == 16
    principal = verifier.verify("POST", PATH, BODY, headers)
    assert principal.client_id == signer[0]
    assert principal.credential == "signature"


def test_p256_signature_is_raw_r_s(p256_key: ec.EllipticCurvePrivateKey) -> None:
    headers = sign_request("GET", "/v1/keys", b"", "mobile", p256_key, now=NOW)
    assert len(base64.b64decode(headers[HEADER_SIGNATURE])) == 64


def test_p256_der_signature_is_refused(
    verifier: RequestVerifier, p256_key: ec.EllipticCurvePrivateKey
) -> None:
    headers = sign_request("POST", PATH, BODY, "mobile", p256_key, now=NOW)
    message = canonical_request(
        "POST", PATH, BODY, headers[HEADER_TIMESTAMP], headers[HEADER_NONCE]
    )
    der = p256_key.sign(message, ec.ECDSA(hashes.SHA256()))
    headers[HEADER_SIGNATURE] = base64.b64encode(der).decode()
    with pytest.raises(AccessDenied, match="does not verify for client 'mobile'"):
        verifier.verify("POST", PATH, BODY, headers)


def test_header_names_are_case_insensitive(
    verifier: RequestVerifier, signer: tuple[str, PrivateKey]
) -> None:
    headers = {name.lower(): value for name, value in signed(signer).items()}
    assert verifier.verify("POST", PATH, BODY, headers).client_id == signer[0]


def test_sign_request_refuses_other_curves() -> None:
    with pytest.raises(InvalidField, match="Ed25519 or P-256"):
        sign_request("GET", "/", b"", "c", ec.generate_private_key(ec.SECP384R1()), now=NOW)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", PATH, BODY),
        ("POST", "/v1/keys/abc/sign?dry_run=1", BODY),
        ("POST", "/v1/keys/abd/sign?dry_run=0", BODY),
        ("POST", PATH, BODY + b" "),
        ("POST", PATH, b""),
    ],
)
def test_any_change_to_the_request_breaks_the_signature(
    verifier: RequestVerifier, signer: tuple[str, PrivateKey], method: str, path: str, body: bytes
) -> None:
    with pytest.raises(AccessDenied, match=f"does not verify for client '{signer[0]}'"):
        verifier.verify(method, path, body, signed(signer))


@pytest.mark.parametrize("header", [HEADER_TIMESTAMP, HEADER_NONCE])
def test_changed_timestamp_or_nonce_breaks_the_signature(
    verifier: RequestVerifier, signer: tuple[str, PrivateKey], header: str
) -> None:
    headers = signed(signer)
    headers[header] = "1700000001" if header == HEADER_TIMESTAMP else "ab" * 16
    with pytest.raises(AccessDenied, match="does not verify"):
        verifier.verify("POST", PATH, BODY, headers)


def test_signature_by_another_clients_key_is_refused(
    verifier: RequestVerifier, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    impostor = ed25519.Ed25519PrivateKey.generate()
    headers = sign_request("POST", PATH, BODY, "wallet-hot", impostor, now=NOW)
    with pytest.raises(AccessDenied, match="does not verify for client 'wallet-hot'"):
        verifier.verify("POST", PATH, BODY, headers)
    headers = sign_request("POST", PATH, BODY, "mobile", ed_key, now=NOW)
    with pytest.raises(AccessDenied, match="does not verify for client 'mobile'"):
        verifier.verify("POST", PATH, BODY, headers)


def test_unknown_and_bearer_only_clients_are_refused(
    verifier: RequestVerifier, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    headers = sign_request("POST", PATH, BODY, "stranger", ed_key, now=NOW)
    with pytest.raises(AccessDenied, match="unknown client 'stranger'"):
        verifier.verify("POST", PATH, BODY, headers)
    headers = sign_request("POST", PATH, BODY, "web3-bridge", ed_key, now=NOW)
    with pytest.raises(AccessDenied, match="'web3-bridge' authenticates with a bearer token"):
        verifier.verify("POST", PATH, BODY, headers)


@pytest.mark.parametrize(
    "missing", [HEADER_CLIENT, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE]
)
def test_missing_headers_are_refused(
    verifier: RequestVerifier, signer: tuple[str, PrivateKey], missing: str
) -> None:
    headers = signed(signer)
    del headers[missing]
    with pytest.raises(AccessDenied, match=f"missing header {missing}"):
        verifier.verify("POST", PATH, BODY, headers)
    headers[missing] = ""
    with pytest.raises(AccessDenied, match=f"missing header {missing}"):
        verifier.verify("POST", PATH, BODY, headers)


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        (HEADER_TIMESTAMP, "1700000000.0", "timestamp must be decimal"),
        (HEADER_TIMESTAMP, "0x65", "timestamp must be decimal"),
        (HEADER_TIMESTAMP, "9" * 13, "timestamp must be decimal"),
        (HEADER_NONCE, "ab" * 8, "nonce must be 16-64 bytes"),
        (HEADER_NONCE, "AB" * 16, "nonce must be 16-64 bytes"),
        (HEADER_NONCE, "xy" * 16, "nonce must be 16-64 bytes"),
        (HEADER_SIGNATURE, "not base64!", "not base64"),
        (HEADER_SIGNATURE, "QUFB" * 40, "too long"),
    ],
)
def test_malformed_headers_are_refused(
    verifier: RequestVerifier,
    signer: tuple[str, PrivateKey],
    header: str,
    value: str,
    message: str,
) -> None:
    headers = signed(signer)
    headers[header] = value
    with pytest.raises(AccessDenied, match=f"malformed signed request: .*{message}"):
        verifier.verify("POST", PATH, BODY, headers)


def test_refusals_do_not_echo_the_signature(
    verifier: RequestVerifier, signer: tuple[str, PrivateKey]
) -> None:
    headers = signed(signer, now=NOW + 1)
    headers[HEADER_NONCE] = "cd" * 16
    with pytest.raises(AccessDenied) as info:
        verifier.verify("POST", PATH, BODY, headers)
    assert headers[HEADER_SIGNATURE] not in str(info.value)


def test_window_edges(
    verifier: RequestVerifier, clock: FakeClock, signer: tuple[str, PrivateKey]
) -> None:
    for offset in (-300, 300, 0):
        verifier.verify("POST", PATH, BODY, signed(signer, now=NOW + offset))
    with pytest.raises(AccessDenied, match="stale timestamp: signed 301 s ago"):
        verifier.verify("POST", PATH, BODY, signed(signer, now=NOW - 301))
    with pytest.raises(AccessDenied, match="future timestamp: 301 s ahead"):
        verifier.verify("POST", PATH, BODY, signed(signer, now=NOW + 301))


def test_replay_is_refused_within_the_window(
    verifier: RequestVerifier, clock: FakeClock, signer: tuple[str, PrivateKey]
) -> None:
    headers = signed(signer)
    verifier.verify("POST", PATH, BODY, headers)
    for later in (0, 1, 150, 300):
        clock.now = NOW + later
        with pytest.raises(AccessDenied, match=r"nonce already used .*\(replayed request\)"):
            verifier.verify("POST", PATH, BODY, headers)


def test_replay_after_the_window_is_refused_by_its_timestamp(
    verifier: RequestVerifier, clock: FakeClock, signer: tuple[str, PrivateKey]
) -> None:
    """The nonce is forgotten once its timestamp has left the window: safe, because the
    timestamp check now refuses the replay anyway."""
    headers = signed(signer)
    verifier.verify("POST", PATH, BODY, headers)
    clock.now = NOW + 301
    with pytest.raises(AccessDenied, match="stale timestamp"):
        verifier.verify("POST", PATH, BODY, headers)
    verifier.verify("POST", PATH, BODY, signed(signer, now=clock.now))
    assert repr(verifier) == "RequestVerifier(window=300, nonces=1)"


def test_same_nonce_from_two_clients_is_two_requests(
    verifier: RequestVerifier,
    ed_key: ed25519.Ed25519PrivateKey,
    p256_key: ec.EllipticCurvePrivateKey,
) -> None:
    nonce = "77" * 16
    verifier.verify(
        "POST",
        PATH,
        BODY,
        sign_request("POST", PATH, BODY, "wallet-hot", ed_key, now=NOW, nonce=nonce),
    )
    verifier.verify(
        "POST",
        PATH,
        BODY,
        sign_request("POST", PATH, BODY, "mobile", p256_key, now=NOW, nonce=nonce),
    )


def test_a_refused_signature_does_not_burn_the_nonce(
    verifier: RequestVerifier, signer: tuple[str, PrivateKey]
) -> None:
    headers = signed(signer)
    forged = dict(headers, **{HEADER_SIGNATURE: base64.b64encode(b"\x01" * 64).decode()})
    with pytest.raises(AccessDenied, match="does not verify"):
        verifier.verify("POST", PATH, BODY, forged)
    verifier.verify("POST", PATH, BODY, headers)


def test_full_nonce_tracker_refuses_rather_than_forgets(
    registry: ClientsRegistry, clock: FakeClock, signer: tuple[str, PrivateKey]
) -> None:
    verifier = RequestVerifier(
        registry, window=300, now=clock, nonce_capacity=3, nonce_quota=3, not_before=0
    )
    first = signed(signer)
    verifier.verify("POST", PATH, BODY, first)
    for _ in range(2):
        verifier.verify("POST", PATH, BODY, signed(signer))
    with pytest.raises(AccessDenied, match="too many recent requests"):
        verifier.verify("POST", PATH, BODY, signed(signer))
    with pytest.raises(AccessDenied, match="replayed request"):
        verifier.verify("POST", PATH, BODY, first)
    clock.now = NOW + 301
    verifier.verify("POST", PATH, BODY, signed(signer, now=clock.now))


def test_one_client_cannot_fill_the_nonce_store_for_the_others(
    registry: ClientsRegistry,
    clock: FakeClock,
    ed_key: ed25519.Ed25519PrivateKey,
    p256_key: ec.EllipticCurvePrivateKey,
) -> None:
    """With the default quota (a quarter of the capacity), a client that keeps sending is
    refused long before the store is full, and another client's requests still pass."""
    verifier = RequestVerifier(registry, window=300, now=clock, nonce_capacity=8, not_before=0)
    refusals: list[str] = []
    for _ in range(8):
        try:
            verifier.verify("POST", PATH, BODY, signed(("wallet-hot", ed_key)))
        except AccessDenied as exc:
            refusals.append(exc.message)
    assert len(refusals) == 6
    assert all("'wallet-hot' has too many requests in the time window" in m for m in refusals)
    assert verifier.verify("POST", PATH, BODY, signed(("mobile", p256_key))).client_id == "mobile"


def test_nonces_expire_by_their_own_timestamp(
    registry: ClientsRegistry, clock: FakeClock, signer: tuple[str, PrivateKey]
) -> None:
    """A request signed ahead of the clock keeps its nonce until its own timestamp is stale."""
    verifier = RequestVerifier(registry, window=300, now=clock, nonce_capacity=10, not_before=0)
    ahead = signed(signer, now=NOW + 200)
    verifier.verify("POST", PATH, BODY, ahead)
    clock.now = NOW + 450
    with pytest.raises(AccessDenied, match="replayed request"):
        verifier.verify("POST", PATH, BODY, ahead)


def test_bearer_through_the_verifier(verifier: RequestVerifier) -> None:
    assert verifier.verify_bearer(BEARER_TOKEN).client_id == "web3-bridge"
    with pytest.raises(AccessDenied):
        verifier.verify_bearer("guess")


def test_requests_signed_before_a_restart_are_refused(
    registry: ClientsRegistry, clock: FakeClock, signer: tuple[str, PrivateKey]
) -> None:
    """A restarted enclave has forgotten its nonces; a host replaying the last minutes'
    requests into a fresh verifier must still be refused."""
    clock.now = NOW - 100
    running = RequestVerifier(registry, now=clock)
    clock.now = NOW
    before = signed(signer, now=NOW - 10)
    running.verify("POST", PATH, BODY, before)
    clock.now = NOW + 0.5
    restarted = RequestVerifier(registry, now=clock)
    with pytest.raises(AccessDenied, match="signed before the enclave started"):
        restarted.verify("POST", PATH, BODY, before)
    restarted.verify("POST", PATH, BODY, signed(signer, now=NOW + 1))
