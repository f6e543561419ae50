"""``signd kms-server`` (a local KMS speaking the AWS protocol) and ``signd kms policy``.

Registered in ``main.py`` with ``app.add_typer(kms_app)``: the commands join the top level.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from signd.cli.context import state
from signd.cli.output import emit, handles_errors, stderr, stdout
from signd.config import default_home
from signd.errors import InvalidField

kms_app = typer.Typer(no_args_is_help=True)
kms_tools_app = typer.Typer(help="KMS helpers for real AWS deployments.", no_args_is_help=True)
kms_app.add_typer(kms_tools_app, name="kms")

PCR_HEX_SIZE = 96


@kms_app.command("kms-server")
@handles_errors
def kms_server(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port on 127.0.0.1 (0: any).")
    ] = 0,
    home: Annotated[
        Path | None, typer.Option("--home", help="Data directory (default: signd's home).")
    ] = None,
    region: Annotated[str, typer.Option(help="Region the server answers as.")] = "us-east-1",
    dev_ca: Annotated[
        Path | None,
        typer.Option(help="Development CA of the simulated NSM (default HOME/attestation/dev-ca)."),
    ] = None,
    trust_aws_root: Annotated[
        bool, typer.Option(help="Also accept documents from real Nitro Enclaves.")
    ] = False,
) -> None:
    """Serve a local KMS on 127.0.0.1 for boto3 (`endpoint_url`), with attestation policies.

    Writes HOME/kms-server.json (mode 0600): endpoint, region and the access key to sign with.
    """
    from signd.hardening import refuse_core_dumps_and_attach
    from signd.kms.server.http import create_server, serve_until_signalled

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    refuse_core_dumps_and_attach()  # before it reads its key material
    base = home or state.home or default_home()
    server, info = create_server(
        base, port=port, region=region, dev_ca_dir=dev_ca, trust_aws_root=trust_aws_root
    )
    stderr.print(f"kms-server listening on {info.endpoint} (details in {base / 'kms-server.json'})")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    serve_until_signalled(server, stop)


def _measurement(value: str, name: str) -> bytes:
    text = value.strip().removeprefix("0x").lower()
    if len(text) != PCR_HEX_SIZE:
        raise InvalidField(f"{name} must be {PCR_HEX_SIZE} hex digits (SHA-384)", field=name)
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidField(f"{name} must be hex", field=name) from None


PcrOption = Annotated[str | None, typer.Option(help="SHA-384 measurement, 96 hex digits.")]


@kms_tools_app.command("policy")
@handles_errors
def kms_policy(
    enclave_role: Annotated[
        str, typer.Option(help="ARN of the role the enclave's parent instance uses.")
    ],
    admin_principal: Annotated[
        str | None,
        typer.Option(help="ARN that administers the key (default: the account root)."),
    ] = None,
    pcr0: PcrOption = None,
    pcr1: PcrOption = None,
    pcr2: PcrOption = None,
    pcr3: PcrOption = None,
    pcr4: PcrOption = None,
    pcr8: PcrOption = None,
    image_sha384: PcrOption = None,
) -> None:
    """Print an AWS key policy that releases data keys only to an attested enclave."""
    from signd.kms.server.policy import attestation_key_policy

    given = {0: pcr0, 1: pcr1, 2: pcr2, 3: pcr3, 4: pcr4, 8: pcr8}
    pcrs = {i: _measurement(v, f"pcr{i}") for i, v in given.items() if v is not None}
    image = _measurement(image_sha384, "image_sha384") if image_sha384 is not None else None
    if not pcrs and image is None:
        raise InvalidField("give at least one of --pcr0.. or --image-sha384", field="pcr0")
    parts = enclave_role.split(":")
    if len(parts) < 6 or parts[:3] != ["arn", "aws", "iam"] or not parts[4].isdigit():
        raise InvalidField("enclave role must be an IAM ARN", field="enclave_role")
    admin = admin_principal or f"arn:aws:iam::{parts[4]}:root"
    policy = attestation_key_policy(
        enclave_principal=enclave_role, admin_principal=admin, pcrs=pcrs, image_sha384=image
    )
    sys.stdout.write(json.dumps(policy, indent=2) + "\n")


_PCR0_CONDITION = "kms:recipientattestation:pcr0"


def _pinned_pcr0(document: str) -> list[str]:
    """The PCR0 values a key policy's conditions name (lower-case hex, sorted)."""
    try:
        statements = json.loads(document).get("Statement", [])
    except (ValueError, AttributeError):
        return []
    values: set[str] = set()
    for statement in statements if isinstance(statements, list) else [statements]:
        conditions = statement.get("Condition", {}) if isinstance(statement, dict) else {}
        for tests in conditions.values() if isinstance(conditions, dict) else []:
            for key, value in tests.items() if isinstance(tests, dict) else []:
                if key.lower() == _PCR0_CONDITION:
                    values.update(v.lower() for v in ([value] if isinstance(value, str) else value))
    return sorted(values)


def _interactive() -> bool:
    return sys.stdin.isatty()


def _confirm(question: str) -> bool:
    if not _interactive():
        raise InvalidField(
            "refusing to re-pin without a terminal to confirm on; pass --yes", field="yes"
        )
    return typer.confirm(question, default=False, err=True)


@kms_tools_app.command("repin")
@handles_errors
def kms_repin(
    home: Annotated[
        Path | None, typer.Option("--home", help="Data directory (default: signd's home).")
    ] = None,
    pcr0: Annotated[
        str | None,
        typer.Option(help="PCR0 to pin, 96 hex digits (default: this signd's code, measured)."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Re-pin the embedded KMS key (alias/signd-enclave) to a new enclave PCR0.

    The key policy of the home's kms-server releases data keys only to an enclave whose PCR0
    matches the one pinned on first run, so after an upgrade of signd the new code cannot
    unseal any key. Run this deliberately, after upgrading: it replaces the policy with one
    pinning the PCR0 of the signd code this command runs (what `signd enclave measure` prints)
    or --pcr0, which LETS THE NEW CODE UNSEAL EVERY KEY IN THAT HOME, and the old code none.
    Prints the old and new PCR0 and asks first unless --yes (required without a terminal).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from signd.attestation.measurement import measure_code
    from signd.config import load_settings
    from signd.errors import ConfigurationError, DependencyUnavailable
    from signd.operations.components import EMBEDDED_KMS_TYPE
    from signd.operations.local_kms import (
        ATTESTED_ALIAS,
        LocalKmsServer,
        attested_key_policy,
        home_lock,
    )

    base = home or state.home or default_home()
    settings = load_settings(base)
    section = settings.section("kms")
    kms_type = section.get("type", "local" if section else EMBEDDED_KMS_TYPE)
    if kms_type != EMBEDDED_KMS_TYPE:
        raise ConfigurationError(
            f"[kms] type is {kms_type!r}: repin changes the embedded kms-server's key only; "
            "for AWS KMS, put a policy from `signd kms policy` on the key",
            field="kms.type",
        )
    if not (base / "kms-server").is_dir():
        raise ConfigurationError(f"{base} has no embedded kms-server (nothing to re-pin)")
    if pcr0 is not None:
        new, source = _measurement(pcr0, "pcr0"), "--pcr0"
    elif settings.section("enclave").get("attestation", "simulated") == "nsm":
        raise InvalidField(
            'with [enclave] attestation = "nsm" give --pcr0 (from nitro-cli describe-eif)',
            field="pcr0",
        )
    else:
        new, source = measure_code(), "this signd's code"

    server = LocalKmsServer(base)
    try:
        client = server.ensure().client()
        try:
            with home_lock(base):
                try:
                    metadata = client.describe_key(KeyId=ATTESTED_ALIAS)["KeyMetadata"]
                except client.exceptions.NotFoundException:
                    raise ConfigurationError(
                        f"{base}'s kms-server has no {ATTESTED_ALIAS} yet (nothing to re-pin;"
                        " it is created, pinned to the running code, on first use)"
                    ) from None
                key_arn = str(metadata["Arn"])
                document = client.get_key_policy(KeyId=key_arn, PolicyName="default")["Policy"]
                old = _pinned_pcr0(document)
                result = {
                    "alias": ATTESTED_ALIAS,
                    "key_arn": key_arn,
                    "old_pcr0": old,
                    "new_pcr0": new.hex(),
                    "changed": old != [new.hex()],
                }
                stderr.print(f"{ATTESTED_ALIAS} under {base}")
                stderr.print(f"  pinned PCR0: {', '.join(old) or '(none)'}")
                stderr.print(f"  new PCR0:    {new.hex()} ({source})")
                if result["changed"]:
                    if not yes and not _confirm(
                        "Let the enclave code with the new PCR0 unseal every key in this home?"
                    ):
                        stderr.print("not re-pinned")
                        raise typer.Exit(1)
                    client.put_key_policy(
                        KeyId=key_arn, PolicyName="default", Policy=attested_key_policy(new)
                    )
        except (BotoCoreError, ClientError) as exc:
            code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else ""
            raise DependencyUnavailable(
                f"embedded kms-server: cannot re-pin {ATTESTED_ALIAS}: {code or type(exc).__name__}"
            ) from None
        finally:
            client.close()
    finally:
        server.stop()
    emit(
        result,
        as_json=as_json,
        human=lambda: stdout.print(
            f"re-pinned {ATTESTED_ALIAS} to PCR0 {new.hex()}"
            if result["changed"]
            else f"{ATTESTED_ALIAS} already pins PCR0 {new.hex()}; nothing changed"
        ),
    )
