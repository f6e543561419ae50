"""The OpenAPI 3.1 description of the service, written as data beside the routes.

A test checks that it is a valid OpenAPI 3.1 document, that it lists exactly the routes the
app serves, and (with schemathesis) that the answers match it.
"""

from __future__ import annotations

from typing import Any

from signd.api.settings import ApiSettings

HEX = "^0[xX][0-9a-fA-F]*$"
HASH32 = "^0[xX][0-9a-fA-F]{64}$"
NONCE = "^(0[xX])?([0-9a-fA-F]{2}){1,64}$"
PLAIN_HEX = "^([0-9a-f]{2})*$"
PCR = "^[0-9a-f]{96}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds until the rate limit lets a request through again",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _errors(*statuses: int) -> dict[str, Any]:
    """The error answers of ``statuses``, each ``{"error": {...}}``."""
    reasons = {
        400: "Malformed JSON, a missing or wrong field (named in error.field)",
        401: "No valid credentials: unsigned, wrongly signed, expired or replayed request, an"
        " unknown bearer token, or too many of the client's requests in the time window (code"
        " unauthenticated)",
        403: "Refused by the server's signing gate (e.g. blind signing is disabled)",
        404: "No such key",
        408: "The request body did not arrive within the server's body_timeout (code"
        " request_timeout); the connection is closed",
        409: "The key already exists",
        413: "The request body is too large",
        414: "The path and query are over 8192 characters (uri_too_long)",
        429: "Over the request rate limit (rate_limited): retry after Retry-After seconds",
        431: "More than 32 credential headers, or one over 4096 characters (headers_too_large)",
        500: "Internal error (no detail is given)",
        503: "A custody backend or its dependency is unavailable, or cannot serve signd"
        " (custody_unsupported: e.g. an HSM without secp256k1)",
        507: "The custody backend is out of room for keys",
    }
    if 401 in statuses:  # what authentication refuses before it reads the credentials
        statuses = tuple(sorted({*statuses, 414, 431}))
    answers = {str(status): _json(_ref("Error"), reasons[status]) for status in statuses}
    if "429" in answers:
        answers["429"]["headers"] = RETRY_AFTER
    return answers


SIGNING_ERRORS = (400, 401, 403, 404, 408, 413, 429, 500, 503)


def _security_schemes() -> dict[str, Any]:
    """The two credentials; every operation needs one unless it says ``security: []``."""
    return {
        "bearerToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token registered for the client (the server keeps only its SHA-256);"
            " for JSON-RPC clients that cannot sign requests.",
        },
        "requestSignature": {
            "type": "apiKey",
            "in": "header",
            "name": "X-Signd-Signature",
            "description": "The client's Ed25519 or P-256 signature over the method, the path with"
            " its query, the body's SHA-256, X-Signd-Timestamp and X-Signd-Nonce, sent with"
            " X-Signd-Client, X-Signd-Timestamp and X-Signd-Nonce (docs/API.md); signd.client"
            " signs for you. The enclave checks it, the time window and that the nonce is new.",
        },
    }


def _authenticated() -> list[dict[str, list[str]]]:
    """Either credential, never both in one request."""
    return [{"bearerToken": []}, {"requestSignature": []}]


def _public() -> list[dict[str, list[str]]]:
    """No credential: probes, this document and the enclave's attestation."""
    return []


def _signing_operation(
    summary: str, request: str, response: str, operation_id: str
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["signing"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": _json(_ref(response), "The signature"),
                **_errors(*SIGNING_ERRORS),
            },
        }
    }


def _schemas(settings: ApiSettings) -> dict[str, Any]:
    key_ref = {"type": "string", "minLength": 1, "description": "Key id or 0x address"}
    hex_string = {"type": "string", "pattern": HEX}
    message = {
        "oneOf": [
            {"type": "string", "description": "Text, signed as its UTF-8 bytes"},
            {
                "type": "object",
                "properties": {"hex": {"type": "string", "pattern": "^0[xX]([0-9a-fA-F]{2})*$"}},
                "required": ["hex"],
                "additionalProperties": False,
                "description": "Raw bytes as 0x hex",
            },
        ]
    }
    requests: dict[str, dict[str, Any]] = {
        "HashSignRequest": {
            "type": "object",
            "properties": {"key": key_ref, "hash": {"type": "string", "pattern": HASH32}},
            "required": ["key", "hash"],
            "additionalProperties": False,
        },
        "TransactionSignRequest": {
            "type": "object",
            "properties": {
                "key": key_ref,
                "transaction": {
                    "type": "object",
                    "description": "Wallet JSON: type, chainId, nonce, to, value, gas, gasPrice,"
                    " maxFeePerGas, maxPriorityFeePerGas, data, accessList, from",
                },
            },
            "required": ["key", "transaction"],
            "additionalProperties": False,
        },
        "MessageSignRequest": {
            "type": "object",
            "properties": {"key": key_ref, "message": message},
            "required": ["key", "message"],
            "additionalProperties": False,
        },
        "TypedDataSignRequest": {
            "type": "object",
            "properties": {
                "key": key_ref,
                "typed_data": {
                    "type": "object",
                    "description": "EIP-712: types, primaryType, domain, message",
                },
            },
            "required": ["key", "typed_data"],
            "additionalProperties": False,
        },
    }
    batch_types = {
        "hash": "HashSignRequest",
        "ethereum/transaction": "TransactionSignRequest",
        "ethereum/message": "MessageSignRequest",
        "ethereum/typed-data": "TypedDataSignRequest",
    }
    batch_items = []
    for type_name, schema_name in batch_types.items():
        item = requests[schema_name]
        batch_items.append(
            {
                "type": "object",
                "properties": {"type": {"const": type_name}, **item["properties"]},
                "required": ["type", *item["required"]],
                "additionalProperties": False,
            }
        )
    return {
        "Error": {
            "type": "object",
            "properties": {"error": _ref("ErrorBody")},
            "required": ["error"],
            "additionalProperties": False,
        },
        "ErrorBody": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string"},
            },
            "required": ["code", "message"],
            "additionalProperties": False,
        },
        "KeyInfo": {
            "type": "object",
            "properties": {
                "key_id": {"type": "string"},
                "chain": {"type": "string"},
                "address": {"type": "string"},
                "public_key": {**hex_string, "description": "Compressed SEC1 public key"},
                "custody": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "details": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": [
                "key_id",
                "chain",
                "address",
                "public_key",
                "custody",
                "created_at",
                "labels",
            ],
            "additionalProperties": False,
        },
        "KeyList": {
            "type": "object",
            "properties": {
                "keys": {"type": "array", "items": _ref("KeyInfo")},
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["keys", "next_cursor"],
            "additionalProperties": False,
        },
        "CreatedKeys": {
            "type": "object",
            "properties": {"keys": {"type": "array", "items": _ref("KeyInfo")}},
            "required": ["keys"],
            "additionalProperties": False,
        },
        "CreateKeysRequest": {
            "type": "object",
            "properties": {
                "chain": {"type": "string", "examples": ["ethereum"]},
                "custody": {"type": "string", "examples": ["keystore", "enclave", "hsm"]},
                "count": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": settings.max_keys_per_request,
                    "default": 1,
                },
                "labels": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {"type": "string", "minLength": 1, "maxLength": 64},
                },
            },
            "required": ["chain", "custody"],
            "additionalProperties": False,
        },
        **requests,
        "DigestSignature": {
            "type": "object",
            "properties": {
                "signature": {**hex_string, "description": "r ‖ s ‖ recovery id, 65 bytes"},
                "r": hex_string,
                "s": hex_string,
                "recovery_id": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["signature", "r", "s", "recovery_id"],
            "additionalProperties": False,
        },
        "SignedTransaction": {
            "type": "object",
            "properties": {
                "raw_transaction": hex_string,
                "hash": {"type": "string", "pattern": HASH32},
                "from": {"type": "string"},
            },
            "required": ["raw_transaction", "hash", "from"],
            "additionalProperties": False,
        },
        "MessageSignature": {
            "type": "object",
            "properties": {
                "signature": {**hex_string, "description": "r ‖ s ‖ v, 65 bytes"},
                "v": {"type": "integer", "enum": [27, 28]},
                "r": hex_string,
                "s": hex_string,
            },
            "required": ["signature", "v", "r", "s"],
            "additionalProperties": False,
        },
        "BatchRequest": {
            "type": "object",
            "properties": {
                "requests": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.max_batch,
                    "items": {"oneOf": batch_items},
                }
            },
            "required": ["requests"],
            "additionalProperties": False,
        },
        "BatchResponse": {
            "type": "object",
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            _ref("DigestSignature"),
                            _ref("SignedTransaction"),
                            _ref("MessageSignature"),
                            _ref("Error"),
                        ]
                    },
                }
            },
            "required": ["results"],
            "additionalProperties": False,
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"const": "ok"}},
            "required": ["status"],
        },
        "Attestation": {
            "type": "object",
            "properties": {
                "document": {
                    "type": "string",
                    "contentEncoding": "base64",
                    "description": "The COSE_Sign1 attestation document exactly as the enclave's"
                    " NSM signed it: verify this, not the fields beside it",
                },
                "pcrs": {
                    "type": "object",
                    "description": "PCR index → SHA-384 measurement, as the document says",
                    "propertyNames": {"pattern": "^([0-9]|[12][0-9]|3[01])$"},
                    "additionalProperties": {"type": "string", "pattern": PCR},
                },
                "user_data": {
                    "type": ["string", "null"],
                    "pattern": PLAIN_HEX,
                    "description": "sha256(policy) ‖ sha256(clients) of the enclave's gate",
                },
                "nonce": {"type": ["string", "null"], "pattern": PLAIN_HEX},
                "module_id": {"type": "string"},
                "timestamp": {"type": "string", "format": "date-time"},
                "verified": {
                    "type": "object",
                    "description": "What this (untrusted) host found verifying the document",
                    "properties": {
                        "ok": {"type": "boolean"},
                        "root": {"enum": ["aws-nitro", "signd-dev"]},
                        "pinned_pcr0": {
                            "type": "array",
                            "items": {"type": "string", "pattern": PCR},
                            "description": "The PCR0 values KMS releases data keys to, that"
                            " PCR0 was compared with (empty: none known)",
                        },
                        "error": _ref("ErrorBody"),
                    },
                    "required": ["ok", "root", "pinned_pcr0"],
                    "additionalProperties": False,
                },
            },
            "required": [
                "document",
                "pcrs",
                "user_data",
                "nonce",
                "module_id",
                "timestamp",
                "verified",
            ],
            "additionalProperties": False,
        },
        "Readiness": {
            "type": "object",
            "properties": {
                "ready": {"type": "boolean"},
                "parts": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "part": {"type": "string"},
                            "status": {"enum": ["ok", "unavailable"]},
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                        },
                        "required": ["part", "status"],
                    },
                },
                "reload": {
                    "type": "object",
                    "description": "The last reload of the clients and policy files (SIGHUP):"
                    " loaded (none since start), reloaded (both put in force) or refused"
                    " (neither: the files in force stay, and the service stays ready)",
                    "properties": {
                        "status": {"enum": ["loaded", "reloaded", "refused"]},
                        "at": {"type": "number", "description": "Unix time"},
                        "reason": {"type": "string", "description": "Why it was refused"},
                        "in_force": {
                            "type": "object",
                            "properties": {
                                "clients_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                "policy_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                            },
                            "additionalProperties": False,
                        },
                    },
                    "required": ["status", "at", "in_force"],
                    "additionalProperties": False,
                },
            },
            "required": ["ready", "parts"],
        },
        "JsonRpcRequest": {
            "type": "object",
            "properties": {
                "jsonrpc": {"const": "2.0"},
                "id": {"type": ["string", "integer", "null"]},
                "method": {"type": "string"},
                "params": {"type": ["array", "object"]},
            },
            "required": ["jsonrpc", "method"],
        },
        "JsonRpcResponse": {
            "type": "object",
            "properties": {
                "jsonrpc": {"const": "2.0"},
                "id": {"type": ["string", "number", "null"]},
                "result": {},
                "error": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "integer"},
                        "message": {"type": "string"},
                        "data": {},
                    },
                    "required": ["code", "message"],
                },
            },
            "required": ["jsonrpc", "id"],
        },
    }


def _jsonrpc_operation(operation_id: str) -> dict[str, Any]:
    single_or_batch = {
        "oneOf": [_ref("JsonRpcResponse"), {"type": "array", "items": _ref("JsonRpcResponse")}]
    }
    return {
        "post": {
            "operationId": operation_id,
            "summary": "Ethereum JSON-RPC 2.0 (single or batch); see docs/API.md for methods",
            "tags": ["json-rpc"],
            "requestBody": {
                "required": True,
                "description": "A JSON-RPC request or a batch. Any JSON is accepted: what is not"
                " a valid request gets a JSON-RPC error (-32700, -32600), with HTTP 200.",
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                _ref("JsonRpcRequest"),
                                {"type": "array", "items": _ref("JsonRpcRequest")},
                            ]
                        }
                    }
                },
            },
            "responses": {
                "200": _json(single_or_batch, "The answer (JSON-RPC errors included)"),
                "204": {"description": "Only notifications were sent"},
                "400": _json(
                    _ref("JsonRpcResponse"),
                    "A query string (no POST route takes one): error -32600, data.code"
                    " invalid_request",
                ),
                "401": _json(
                    _ref("JsonRpcResponse"),
                    "No valid credentials: error -32010, data.code unauthenticated",
                ),
                "408": _json(
                    _ref("JsonRpcResponse"),
                    "The request body did not arrive within the server's body_timeout: error"
                    " -32600, data.code request_timeout, id null; the connection is closed",
                ),
                "413": _json(
                    _ref("JsonRpcResponse"),
                    "The request body is too large: error -32600, data.code payload_too_large",
                ),
                "414": _json(
                    _ref("JsonRpcResponse"),
                    "The path and query are over 8192 characters: data.code uri_too_long",
                ),
                "431": _json(
                    _ref("JsonRpcResponse"),
                    "More than 32 credential headers, or one over 4096 characters:"
                    " data.code headers_too_large",
                ),
                "429": {
                    **_json(
                        _ref("JsonRpcResponse"),
                        "Over the request rate limit: error -32005, data.code rate_limited",
                    ),
                    "headers": RETRY_AFTER,
                },
                "503": _json(
                    _ref("JsonRpcResponse"),
                    "The enclave could not authenticate the request (down or not answering):"
                    " error -32006, data.code dependency_unavailable",
                ),
            },
        }
    }


def openapi_document(settings: ApiSettings | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for an app with these settings."""
    settings = settings or ApiSettings()
    keys_tag = ["keys"]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "signd",
            "version": "1",
            "description": "Keys and signatures from a signing machine for custody wallets. "
            'Errors are {"error": {"code", "message", "field"?}}, except the HTTP server\'s own'
            " 503 (text/plain, Service Unavailable) to any request past its connection cap"
            " (max_connections).",
        },
        "paths": {
            "/v1/keys": {
                "post": {
                    "operationId": "createKeys",
                    "summary": "Create keys; their private keys never leave custody",
                    "tags": keys_tag,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("CreateKeysRequest")}},
                    },
                    "responses": {
                        "201": _json(_ref("CreatedKeys"), "The new keys"),
                        **_errors(400, 401, 403, 408, 413, 429, 500, 503, 507),
                    },
                },
                "get": {
                    "operationId": "listKeys",
                    "summary": "List keys of one custody, in creation order, a page at a time",
                    "tags": keys_tag,
                    "parameters": [
                        {
                            "name": "custody",
                            "in": "query",
                            "schema": {"type": "string", "default": "keystore"},
                        },
                        {"name": "chain", "in": "query", "schema": {"type": "string"}},
                        {"name": "label", "in": "query", "schema": {"type": "string"}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 1000,
                                "default": 100,
                            },
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("KeyList"), "One page of keys"),
                        **_errors(400, 401, 403, 429, 500, 503),
                    },
                },
            },
            "/v1/keys/{key}": {
                "get": {
                    "operationId": "getKey",
                    "summary": "One key, by key id or address",
                    "tags": keys_tag,
                    "parameters": [
                        {
                            "name": "key",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(_ref("KeyInfo"), "The key"),
                        **_errors(400, 401, 403, 404, 429, 500, 503),
                    },
                }
            },
            "/v1/sign/hash": _signing_operation(
                "Sign a raw 32-byte hash (blind signing: disabled unless the server enables it)",
                "HashSignRequest",
                "DigestSignature",
                "signHash",
            ),
            "/v1/sign/ethereum/transaction": _signing_operation(
                "Validate, sign and assemble an Ethereum transaction",
                "TransactionSignRequest",
                "SignedTransaction",
                "signEthereumTransaction",
            ),
            "/v1/sign/ethereum/message": _signing_operation(
                "EIP-191 personal_sign of a text or hex message",
                "MessageSignRequest",
                "MessageSignature",
                "signEthereumMessage",
            ),
            "/v1/sign/ethereum/typed-data": _signing_operation(
                "EIP-712 typed data (eth_signTypedData_v4)",
                "TypedDataSignRequest",
                "MessageSignature",
                "signEthereumTypedData",
            ),
            "/v1/sign/batch": {
                "post": {
                    "operationId": "signBatch",
                    "summary": "Several signing requests; results in order, each a result or"
                    " an error",
                    "tags": ["signing"],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("BatchRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("BatchResponse"), "One result per request, in order"),
                        **_errors(400, 401, 403, 408, 413, 429, 500, 503),
                    },
                }
            },
            "/v1/attestation": {
                "get": {
                    "operationId": "getAttestation",
                    "security": _public(),
                    "summary": "A fresh attestation document of the enclave, binding your nonce"
                    " (public: no credential needed)",
                    "tags": ["attestation"],
                    "parameters": [
                        {
                            "name": "nonce",
                            "in": "query",
                            "required": True,
                            "description": "1-64 bytes as hex, 0x optional",
                            "schema": {"type": "string", "pattern": NONCE},
                        }
                    ],
                    "responses": {
                        "200": _json(
                            _ref("Attestation"), "The document and this host's verdict on it"
                        ),
                        "400": _json(_ref("Error"), "The nonce is missing or malformed"),
                        "404": _json(
                            _ref("Error"),
                            "attestation_not_configured: no custody runs in an enclave, or its"
                            " attestation is off",
                        ),
                        "500": _json(_ref("Error"), "Internal error (no detail is given)"),
                        "503": _json(_ref("Error"), "The enclave or its NSM is unavailable"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "security": _public(),
                    "summary": "The process is alive",
                    "tags": ["operations"],
                    "responses": {"200": _json(_ref("Health"), "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "security": _public(),
                    "summary": "Ready when every configured custody backend is healthy and"
                    " the enclave's attestation verifies; with a gate, how its last reload"
                    " went",
                    "tags": ["operations"],
                    "responses": {
                        "200": _json(_ref("Readiness"), "Ready"),
                        "503": _json(_ref("Readiness"), "Not ready; the parts say why"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "security": _public(),
                    "summary": "Prometheus metrics (text format 0.0.4)",
                    "tags": ["operations"],
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "security": _public(),
                    "summary": "This document",
                    "tags": ["operations"],
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI document")},
                }
            },
            "/": _jsonrpc_operation("jsonRpcRoot"),
            "/rpc": _jsonrpc_operation("jsonRpc"),
        },
        "security": _authenticated(),
        "components": {"schemas": _schemas(settings), "securitySchemes": _security_schemes()},
    }
