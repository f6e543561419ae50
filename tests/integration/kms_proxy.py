"""A compromised host between the enclave and kms-server: it relays, or forges KMS answers.

:class:`ForgingKmsProxy` listens on 127.0.0.1 and forwards every request byte for byte to a
real kms-server (SigV4 still verifies: the headers are unchanged). Its ``forge`` attribute
decides what it does with the answers:

- ``None``: relay honestly;
- ``"plaintext"``: answer GenerateDataKey itself with ``Plaintext`` = a data key it chose and
  a ``CiphertextBlob`` it made up (what a host without recipient mode could do);
- ``"recipient-own-blob"``: answer GenerateDataKey with ``CiphertextForRecipient`` = its own
  data key sealed to the RSA key it read from the request's attestation document, and a
  made-up ``CiphertextBlob``; Decrypt is relayed;
- ``"recipient-real-blob"``: relay GenerateDataKey, then swap its ``CiphertextForRecipient``
  for its own data key sealed to the enclave; Decrypt is relayed;
- ``"decrypt-plaintext"``: relay Decrypt and add a ``Plaintext`` (a key it chose) to the answer.

It names itself the way a kms-server does (``Server: signd-kms-server``), as a hostile host
would: that header tells a kms-server from a program that took a dead one's port, it is no
defence against an attacker (recipient mode is).

``forged_keys`` records every data key the proxy chose, so a test can show it would know the
key had the enclave accepted it.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signd.attestation import AttestationDocument, CoseSign1
from signd.kms.cms import seal_for_recipient
from signd.kms.server.http import SERVER_NAME


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ForgingKmsProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.forge: str | None = None
        self.forged_keys: list[bytes] = []
        self.operations: list[str] = []
        self.recipient_requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def version_string(self) -> str:
                return SERVER_NAME

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer = proxy.handle(dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _relay(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection(
            self.upstream.hostname or "", self.upstream.port, timeout=10
        )
        try:
            connection.request("POST", "/", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def _forged_key_for(self, request: dict[str, Any]) -> str:
        """A data key of the proxy's choosing, sealed to the RSA key in the request."""
        document = base64.b64decode(request["Recipient"]["AttestationDocument"])
        attested = AttestationDocument.decode(CoseSign1.decode(document).payload)
        assert attested.public_key is not None
        public_key = serialization.load_der_public_key(attested.public_key)
        assert isinstance(public_key, rsa.RSAPublicKey)
        data_key = secrets.token_bytes(32)
        self.forged_keys.append(data_key)
        return _b64(seal_for_recipient(data_key, public_key))

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        operation = headers.get("X-Amz-Target", "").removeprefix("TrentService.")
        self.operations.append(operation)
        request = json.loads(body) if body else {}
        if "Recipient" in request:
            self.recipient_requests += 1
        forge = self.forge
        if operation == "GenerateDataKey" and forge == "plaintext":
            data_key = secrets.token_bytes(32)
            self.forged_keys.append(data_key)
            answer = {
                "Plaintext": _b64(data_key),
                "CiphertextBlob": _b64(secrets.token_bytes(150)),
                "KeyId": "forged",
            }
            return 200, json.dumps(answer).encode()
        if operation == "GenerateDataKey" and forge == "recipient-own-blob":
            answer = {
                "CiphertextForRecipient": self._forged_key_for(request),
                "CiphertextBlob": _b64(secrets.token_bytes(150)),
                "KeyId": "forged",
            }
            return 200, json.dumps(answer).encode()
        status, answer = self._relay(headers, body)
        if status == 200 and operation == "GenerateDataKey" and forge == "recipient-real-blob":
            answer["CiphertextForRecipient"] = self._forged_key_for(request)
        if status == 200 and operation == "Decrypt" and forge == "decrypt-plaintext":
            data_key = secrets.token_bytes(32)
            self.forged_keys.append(data_key)
            answer["Plaintext"] = _b64(data_key)
        return status, json.dumps(answer).encode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
