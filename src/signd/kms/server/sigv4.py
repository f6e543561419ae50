"""Verifying AWS Signature Version 4 on incoming requests, sans I/O.

The server recomputes the signature the way the SigV4 specification (and botocore's signer)
builds it: canonical request → string to sign → HMAC chain over the credential scope, and
compares in constant time. Only the headers the client listed in ``SignedHeaders`` take part.

Failures use the error types AWS answers: ``MissingAuthenticationTokenException`` (no
``Authorization``), ``IncompleteSignatureException`` (a malformed one),
``UnrecognizedClientException`` (unknown access key) and ``InvalidSignatureException`` (a
signature, scope or timestamp that does not verify).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import parse_qsl, quote

from signd.crypto.secret import Secret
from signd.kms.server.errors import KmsApiError

ALGORITHM: Final = "AWS4-HMAC-SHA256"
SERVICE: Final = "kms"
MAX_CLOCK_SKEW: Final = timedelta(minutes=15)
_AMZ_DATE_FORMAT: Final = "%Y%m%dT%H%M%SZ"
_REQUIRED_SIGNED: Final = frozenset({"host", "x-amz-date"})


@dataclass(frozen=True, slots=True)
class AccessKey:
    """A caller's credentials as the server knows them, and the principal they act as."""

    access_key_id: str
    secret_access_key: Secret
    principal_arn: str


@dataclass(frozen=True, slots=True)
class _Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def _incomplete(message: str) -> KmsApiError:
    return KmsApiError("IncompleteSignatureException", message)


def _invalid(message: str) -> KmsApiError:
    return KmsApiError("InvalidSignatureException", message)


def _parse_authorization(value: str) -> _Authorization:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise _incomplete(f"unsupported authorization algorithm; use {ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, text = part.strip().partition("=")
        if not sep:
            raise _incomplete("authorization header is malformed")
        fields[name] = text
    try:
        credential = fields["Credential"].split("/")
        signed_headers = tuple(fields["SignedHeaders"].split(";"))
        signature = fields["Signature"]
    except KeyError:
        raise _incomplete("authorization needs Credential, SignedHeaders and Signature") from None
    if len(credential) != 5 or credential[4] != "aws4_request":
        raise _incomplete("credential must be AKID/date/region/service/aws4_request")
    access_key_id, date, region, service, _ = credential
    if list(signed_headers) != sorted(set(signed_headers)) or not all(signed_headers):
        raise _incomplete("SignedHeaders must be sorted, unique and lower case")
    return _Authorization(access_key_id, date, region, service, signed_headers, signature)


def _canonical_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    encoded = sorted((quote(name, safe="-_.~"), quote(value, safe="-_.~")) for name, value in pairs)
    return "&".join(f"{name}={value}" for name, value in encoded)


def _canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    signed_headers: tuple[str, ...],
    payload_hash: str,
) -> str:
    canonical_headers = "".join(
        f"{name}:{' '.join(headers[name].split())}\n" for name in signed_headers
    )
    return "\n".join(
        [
            method,
            quote(path, safe="/~"),
            _canonical_query(query),
            canonical_headers,
            ";".join(signed_headers),
            payload_hash,
        ]
    )


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def signing_key(secret_access_key: Secret, date: str, region: str, service: str) -> bytes:
    """The SigV4 key derived from the secret for one day, region and service."""
    key = _hmac(b"AWS4" + secret_access_key.reveal_bytes(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def verify_request(
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    access_keys: Mapping[str, AccessKey],
    region: str,
    now: datetime | None = None,
) -> AccessKey:
    """Check the request's SigV4 signature; return the caller's access key.

    ``headers`` maps lower-case header names to their (comma-joined) values.
    """
    value = headers.get("authorization")
    if not value:
        raise KmsApiError(
            "MissingAuthenticationTokenException", "request is missing an Authorization header"
        )
    auth = _parse_authorization(value)
    caller = access_keys.get(auth.access_key_id)
    if caller is None:
        raise KmsApiError(
            "UnrecognizedClientException", "the security token included in the request is invalid"
        )
    if auth.service != SERVICE:
        raise _invalid(f"credential should be scoped to the correct service: '{SERVICE}'")
    if auth.region != region:
        raise _invalid(f"credential should be scoped to a valid region: '{region}'")
    missing = _REQUIRED_SIGNED - set(auth.signed_headers)
    if missing:
        raise _invalid(f"SignedHeaders must include {', '.join(sorted(missing))}")
    absent = [name for name in auth.signed_headers if name not in headers]
    if absent:
        raise _invalid(f"signed header {absent[0]} is not in the request")
    try:
        timestamp = datetime.strptime(headers["x-amz-date"], _AMZ_DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise _invalid("X-Amz-Date must be of the form YYYYMMDDTHHMMSSZ") from None
    if timestamp.strftime("%Y%m%d") != auth.date:
        raise _invalid("credential date does not match X-Amz-Date")
    current = now or datetime.now(UTC)
    if abs(current - timestamp) > MAX_CLOCK_SKEW:
        raise _invalid("signature expired: X-Amz-Date is too far from the server's time")
    payload_hash = hashlib.sha256(body).hexdigest()
    declared = headers.get("x-amz-content-sha256")
    if declared is not None and declared != payload_hash:
        raise _invalid("X-Amz-Content-SHA256 does not match the request body")
    canonical = _canonical_request(method, path, query, headers, auth.signed_headers, payload_hash)
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, headers["x-amz-date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = signing_key(caller.secret_access_key, auth.date, auth.region, auth.service)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, auth.signature):
        raise _invalid(
            "the request signature we calculated does not match the signature you provided"
        )
    return caller
