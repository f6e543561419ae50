"""``signd``: keys, signing, decoding, the demo and the benchmarks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from signd.chains.ethereum.transactions import decode_transaction
from signd.cli.audit import audit_app
from signd.cli.context import state
from signd.cli.kms import kms_app
from signd.cli.output import emit, handles_errors, stderr, stdout
from signd.cli.serve import serve
from signd.cli.services import config_app, enclave_app, proxy_app
from signd.cli.storage import storage_app
from signd.crypto.secret import Secret
from signd.custody.base import KeyInfo
from signd.errors import InvalidField, UnsupportedOperation
from signd.operations.signer import signature_to_dict
from signd.secrets import read_secret_file, resolve_secret

app = typer.Typer(
    help="signd: a signing machine for exchange and custody wallets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, import, list and show keys.", no_args_is_help=True)
sign_app = typer.Typer(help="Sign digests, transactions and messages.", no_args_is_help=True)
eth_app = typer.Typer(help="Ethereum tools that need no key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(sign_app, name="sign")
app.add_typer(eth_app, name="eth")
app.add_typer(enclave_app, name="enclave")
app.add_typer(config_app, name="config")
app.add_typer(proxy_app, name="proxy")
app.add_typer(kms_app)
app.add_typer(audit_app, name="audit")
app.add_typer(storage_app, name="storage")
app.command("serve")(serve)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
KeyOption = Annotated[str, typer.Option("--key", help="Key id or address.")]
ChainOption = Annotated[str, typer.Option("--chain", help="Chain of the key.")]
CustodyOption = Annotated[str, typer.Option("--custody", help="Custody backend.")]
LabelOption = Annotated[list[str] | None, typer.Option("--label", help="Label (repeatable).")]

PROGRESS_THRESHOLD = 100


@app.callback()
def main(
    home: Annotated[
        Path | None,
        typer.Option("--home", envvar="SIGND_HOME", help="Data directory (default ~/.signd)."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="SIGND_URL",
            help="A running signd serve: keys new/list/show and sign go through it.",
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", envvar="SIGND_CLIENT_ID", help="Client id for --url."),
    ] = None,
    client_key: Annotated[
        Path | None,
        typer.Option(
            "--client-key", envvar="SIGND_CLIENT_KEY", help="PEM request-signing key for --url."
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            envvar="SIGND_TIMEOUT",
            help="Seconds each call to --url may take in all, answer included (default 60).",
        ),
    ] = None,
) -> None:
    """signd: a signing machine for exchange and custody wallets."""
    state.home = home
    state.url, state.client_id, state.client_key = url, client_id, client_key
    state.timeout = timeout


def _parse_hex(value: str, *, field: str, size: int | None = None) -> bytes:
    text = value.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise InvalidField(f"{field} must be hex", field=field) from None
    if size is not None and len(data) != size:
        raise InvalidField(f"{field} must be {size} bytes", field=field)
    return data


def _read_json_input(path: Path | None, *, field: str) -> Any:
    try:
        text = sys.stdin.read() if path is None or str(path) == "-" else path.read_text()
    except OSError as exc:
        raise InvalidField(f"cannot read {path}: {exc.strerror}", field=field) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidField(f"{field} is not valid JSON: {exc.msg}", field=field) from None


def _print_keys(keys: list[KeyInfo]) -> None:
    table = Table("key id", "chain", "address", "custody", "created", "labels")
    for key in keys:
        table.add_row(
            key.key_id,
            key.chain,
            key.address,
            key.custody,
            key.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            ", ".join(key.labels),
        )
    stdout.print(table)


# keys


@keys_app.command("new")
@handles_errors
def keys_new(
    chain: ChainOption = "ethereum",
    custody: CustodyOption = "keystore",
    count: Annotated[int, typer.Option("--count", min=1, help="How many keys.")] = 1,
    label: LabelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create new keys; their private keys never leave the custody backend."""
    signer = state.signer
    if count >= PROGRESS_THRESHOLD:
        with Progress(
            *Progress.get_default_columns()[:1],
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=as_json,
        ) as bar:
            task = bar.add_task("creating keys", total=count)
            keys = signer.create_keys(
                chain=chain,
                custody=custody,
                count=count,
                labels=label or (),
                progress=lambda done: bar.update(task, completed=done),
            )
    else:
        keys = signer.create_keys(chain=chain, custody=custody, count=count, labels=label or ())
    emit(
        {"keys": [key.to_dict() for key in keys]},
        as_json=as_json,
        human=lambda: _print_keys(keys),
    )


@keys_app.command("import")
@handles_errors
def keys_import(
    chain: ChainOption = "ethereum",
    custody: CustodyOption = "keystore",
    private_key_file: Annotated[
        Path | None, typer.Option(help="File holding a hex private key (chmod 600).")
    ] = None,
    keystore_json: Annotated[
        Path | None, typer.Option(help="Ethereum keystore v3 JSON file.")
    ] = None,
    keystore_password_file: Annotated[
        Path | None,
        typer.Option(help="Password of the v3 file (else SIGND_IMPORT_PASSWORD or a prompt)."),
    ] = None,
    mnemonic_file: Annotated[
        Path | None, typer.Option(help="File holding a BIP39 mnemonic (chmod 600).")
    ] = None,
    path: Annotated[str | None, typer.Option("--path", help="HD path for --mnemonic-file.")] = None,
    bip39_passphrase_file: Annotated[
        Path | None, typer.Option(help="File holding the BIP39 passphrase, if any.")
    ] = None,
    label: LabelOption = None,
    hsm_id: Annotated[
        str | None, typer.Option("--hsm-id", help="With --custody hsm: adopt by CKA_ID (hex).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Import a key from a private key, a keystore v3 file or a mnemonic into the keystore,
    or adopt an existing HSM key (``--custody hsm --label CKA_LABEL`` or ``--hsm-id``)."""
    from signd.chains import address_deriver
    from signd.custody.keystore import KeystoreBackend

    address_of = address_deriver(chain)
    if custody == "hsm":
        keys = _adopt_hsm_keys(chain, address_of, label, hsm_id)
        emit(
            {"keys": [k.to_dict() for k in keys]}, as_json=as_json, human=lambda: _print_keys(keys)
        )
        return
    sources = [x for x in (private_key_file, keystore_json, mnemonic_file) if x is not None]
    if len(sources) != 1:
        raise InvalidField(
            "give exactly one of --private-key-file, --keystore-json, --mnemonic-file",
            field="source",
        )
    if custody != "keystore":
        raise UnsupportedOperation(f"import into {custody} custody is not supported")
    backend = state.signer.backend("keystore")
    if not isinstance(backend, KeystoreBackend):
        raise UnsupportedOperation("the keystore custody is not a local keystore here")
    labels = label or ()
    if private_key_file is not None:
        raw = read_secret_file(private_key_file)
        secret = Secret(_parse_hex(str(raw.reveal()), field="private_key", size=32))
        keys = [backend.import_private_key(chain, secret, address_of, labels)]
    elif keystore_json is not None:
        document = _read_json_input(keystore_json, field="keystore_json")
        password = resolve_secret(
            what="keystore v3 password",
            env_var="SIGND_IMPORT_PASSWORD",
            file=keystore_password_file,
        )
        keys = [backend.import_keystore_json(chain, document, password, address_of, labels)]
    else:
        assert mnemonic_file is not None
        mnemonic = read_secret_file(mnemonic_file)
        bip39 = read_secret_file(bip39_passphrase_file) if bip39_passphrase_file else None
        keys = [
            backend.import_mnemonic(
                chain, mnemonic, address_of, path=path, bip39_passphrase=bip39, labels=labels
            )
        ]
    emit({"keys": [k.to_dict() for k in keys]}, as_json=as_json, human=lambda: _print_keys(keys))


def _adopt_hsm_keys(
    chain: str, address_of: Callable[[bytes], str], label: list[str] | None, hsm_id: str | None
) -> list[KeyInfo]:
    from signd.custody.hsm import HsmBackend

    if not label and hsm_id is None:
        raise InvalidField("adopting HSM keys needs --label CKA_LABEL or --hsm-id", field="label")
    if label and len(label) > 1:
        raise InvalidField("give one --label (the HSM object label) to adopt", field="label")
    backend = state.signer.backend("hsm")
    if not isinstance(backend, HsmBackend):
        raise UnsupportedOperation(
            "adopting HSM keys is not offered while the HSM runs inside the enclave"
        )
    return backend.adopt_keys(
        chain, address_of, label=label[0] if label else None, key_id_attr=hsm_id
    )


@keys_app.command("list")
@handles_errors
def keys_list(
    custody: CustodyOption = "keystore",
    chain: Annotated[str | None, typer.Option("--chain")] = None,
    label: Annotated[str | None, typer.Option("--label")] = None,
    cursor: Annotated[str | None, typer.Option("--cursor")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    as_json: JsonOption = False,
) -> None:
    """List keys in creation order, a page at a time."""
    page = state.signer.list_keys(
        custody=custody, chain=chain, label=label, cursor=cursor, limit=limit
    )

    def human() -> None:
        _print_keys(page.keys)
        if page.next_cursor:
            stdout.print(f"more: --cursor {page.next_cursor}")

    emit(
        {"keys": [k.to_dict() for k in page.keys], "next_cursor": page.next_cursor},
        as_json=as_json,
        human=human,
    )


@keys_app.command("show")
@handles_errors
def keys_show(
    key: Annotated[str, typer.Argument(help="Key id or address.")], as_json: JsonOption = False
) -> None:
    """Show one key."""
    info = state.signer.get_key(key)
    emit(info.to_dict(), as_json=as_json, human=lambda: _print_keys([info]))


@keys_app.command("export")
@handles_errors
def keys_export(
    key: Annotated[str, typer.Argument(help="Key id or address.")],
    unsafe: Annotated[
        bool,
        typer.Option("--unsafe-export-private-key", help="Required: this prints a private key."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Print a keystore private key. Dangerous: only behind an explicit flag."""
    from signd.custody.keystore import KeystoreBackend

    if not unsafe:
        raise UnsupportedOperation(
            "exporting a private key requires --unsafe-export-private-key", field="unsafe"
        )
    backend, info = state.signer.resolve(key)
    if not isinstance(backend, KeystoreBackend):
        raise UnsupportedOperation(f"{info.custody} keys cannot be exported")
    secret = backend.export_private_key_unsafe(info.key_id)
    emit(
        {
            "key_id": info.key_id,
            "address": info.address,
            "private_key": "0x" + secret.reveal_bytes().hex(),
        },
        as_json=True,
    )


# sign


@sign_app.command("hash")
@handles_errors
def sign_hash(
    digest: Annotated[str, typer.Argument(metavar="HASH", help="0x + 64 hex digits.")],
    key: KeyOption,
    as_json: JsonOption = False,
) -> None:
    """Sign a raw 32-byte hash (blind signing)."""
    signature = state.signer.sign_hash(key, _parse_hex(digest, field="hash", size=32))
    emit(signature_to_dict(signature), as_json=True)


@sign_app.command("eth-tx")
@handles_errors
def sign_eth_tx(
    key: KeyOption,
    file: Annotated[
        Path | None, typer.Option("--file", help="Transaction JSON (- = stdin).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Sign an Ethereum transaction given as wallet JSON."""
    transaction = _read_json_input(file, field="transaction")
    if not isinstance(transaction, dict):
        raise InvalidField("transaction must be a JSON object", field="transaction")
    signed = state.signer.sign_eth_transaction(key, transaction)
    emit(signed.to_dict(), as_json=True)


@sign_app.command("eth-message")
@handles_errors
def sign_eth_message(
    key: KeyOption,
    text: Annotated[str | None, typer.Option("--text", help="UTF-8 message.")] = None,
    hex_message: Annotated[str | None, typer.Option("--hex", help="Hex message bytes.")] = None,
    as_json: JsonOption = False,
) -> None:
    """EIP-191 personal_sign."""
    if (text is None) == (hex_message is None):
        raise InvalidField("give exactly one of --text or --hex", field="message")
    message = text.encode() if text is not None else _parse_hex(hex_message or "", field="hex")
    emit(state.signer.sign_eth_message(key, message).to_dict(), as_json=True)


@sign_app.command("eth-typed-data")
@handles_errors
def sign_eth_typed_data(
    key: KeyOption,
    file: Annotated[Path | None, typer.Option("--file", help="EIP-712 JSON (- = stdin).")] = None,
    as_json: JsonOption = False,
) -> None:
    """EIP-712 typed data (eth_signTypedData_v4)."""
    document = _read_json_input(file, field="typed_data")
    if not isinstance(document, dict):
        raise InvalidField("typed data must be a JSON object", field="typed_data")
    emit(state.signer.sign_eth_typed_data(key, document).to_dict(), as_json=True)


# eth tools


@eth_app.command("decode")
@handles_errors
def eth_decode(
    raw: Annotated[str, typer.Argument(help="Signed raw transaction, 0x hex.")],
    as_json: JsonOption = False,
) -> None:
    """Decode a signed transaction: its fields, hash and sender."""
    signed = decode_transaction(_parse_hex(raw, field="raw_transaction"))
    emit(signed.to_dict(decoded=True), as_json=True)


# demo and bench


@app.command("demo")
@handles_errors
def demo(as_json: JsonOption = False) -> None:
    """Create a throwaway home, an address, sign a transaction and a message, verify both."""
    from signd.cli.demo import run_demo

    run_demo(as_json=as_json)


@app.command("bench")
@handles_errors
def bench(
    only: Annotated[list[str] | None, typer.Option("--only", help="Run just these.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer iterations.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Run the benchmarks; each figure is printed with its same-run baseline and ratio."""
    from signd.benchmarks import run_benchmarks

    run_benchmarks(only=only or None, quick=quick, as_json=as_json)
