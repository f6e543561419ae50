"""The S3 blob store (boto3), for several nodes sharing one bucket.

``put`` never overwrites: it sends ``If-None-Match: *`` (a conditional write, which S3 and
moto honour) and maps the 412 answer to KeyExists. An endpoint that answers 501 to that
header is remembered and written to with a HEAD then a PUT instead, which can race with a
concurrent writer of the same name. Every call is bounded by connect and read timeouts and a
small number of attempts, so an endpoint that is down or stuck raises DependencyUnavailable
within about ``timeout * max_attempts`` seconds.

``list_blobs`` pages through ``ListObjectsV2`` (``list_page_size`` keys a request, the most S3
answers being 1000), taking each blob's size and ``LastModified`` from the listing, and
``stat`` is a HEAD: neither reads a byte of any blob.

``quarantine`` moves ``<prefix><name>`` to ``<prefix>quarantine/<name>``, which the listing
skips (a name with ``/`` is no blob name) and no read asks for: a ``CopyObject`` inside the
bucket (with ``If-None-Match: *`` where the endpoint takes it), then a ``DeleteObject`` of the
original. A quarantined object of that name already there is taken for this blob's copy only
when its size and ETag are the blob's (a move that stopped before its delete); otherwise the
blob stays where it is and KeyExists is raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from signd.errors import DependencyUnavailable, InvalidField, KeyExists, KeyNotFound
from signd.storage.base import BlobStat, BlobStore, check_range
from signd.storage.blobs import check_blob_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CopySourceTypeDef, HeadObjectOutputTypeDef

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})
QUARANTINE_PREFIX = "quarantine/"
"""Below the store's prefix: where quarantined blobs are kept, under their names."""


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Blobs as objects ``<prefix><name>`` in one S3 bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: S3Client | None = None,
        timeout: float = 5.0,
        max_attempts: int = 2,
        conditional_put: bool = True,
        list_page_size: int = 1000,
    ) -> None:
        """Use ``client`` as given (the caller closes it), or build one with these timeouts."""
        self.bucket = bucket
        self.list_page_size = list_page_size
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._conditional_put = conditional_put
        self._owns_client = client is None
        if client is None:
            config = Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint_url else None,
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        self._client = client

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        if not self._conditional_put:
            self._put_if_absent(name, key, bytes(data))
            return
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data), IfNoneMatch="*")
        except ClientError as exc:
            code = _error_code(exc)
            if code in _EXISTS_CODES:
                raise KeyExists(f"blob {name!r} already exists") from exc
            if code not in _UNSUPPORTED_CODES:
                raise self._unavailable(f"write blob {name!r}", exc) from exc
            self._conditional_put = False
            self._put_if_absent(name, key, bytes(data))
        except BotoCoreError as exc:
            raise self._unavailable(f"write blob {name!r}", exc) from exc

    def get(self, name: str) -> bytes:
        key = self._key(name)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise KeyNotFound(f"no blob {name!r}") from exc
            raise self._unavailable(f"read blob {name!r}", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(f"read blob {name!r}", exc) from exc

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        key = self._key(name)
        byte_range = f"bytes={offset}-{offset + length - 1}"
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
            data: bytes = response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES | {"InvalidRange", "416"}:
                raise KeyNotFound(f"no blob {name!r} with bytes {byte_range}") from exc
            raise self._unavailable(f"read blob {name!r}", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(f"read blob {name!r}", exc) from exc
        if len(data) != length:
            raise KeyNotFound(f"blob {name!r} has no bytes {offset}..{offset + length}")
        return data

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call(f"delete blob {name!r}", self._client.delete_object, Bucket=self.bucket, Key=key)

    def stat(self, name: str) -> BlobStat | None:
        head = self._head(self._key(name), f"stat blob {name!r}")
        return None if head is None else BlobStat(name, head["ContentLength"], head["LastModified"])

    def list_blobs(self, prefix: str = "") -> Iterator[BlobStat]:
        return self._list(self.prefix, prefix, "list the blobs")

    def quarantine(self, name: str) -> str:
        source = self._key(name)
        target = self.prefix + QUARANTINE_PREFIX + name
        action = f"quarantine blob {name!r}"
        original = self._head(source, action)
        if original is None:
            raise KeyNotFound(f"no blob {name!r}")
        held = self._head(target, action)
        if held is None:
            self._copy_new(source, target, name, action)
        elif (held["ContentLength"], held["ETag"]) != (original["ContentLength"], original["ETag"]):
            raise KeyExists(f"the quarantine already holds another blob named {name!r}")
        self._call(action, self._client.delete_object, Bucket=self.bucket, Key=source)
        return f"s3://{self.bucket}/{target}"

    def list_quarantined(self) -> Iterator[BlobStat]:
        return self._list(self.prefix + QUARANTINE_PREFIX, "", "list the quarantine")

    def _list(self, folder: str, prefix: str, action: str) -> Iterator[BlobStat]:
        """The blobs directly under ``folder`` (a key prefix) whose names start with
        ``prefix``, a page at a time."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=folder + prefix,
            PaginationConfig={"PageSize": self.list_page_size},
        )
        try:
            for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(folder) :]
                    try:
                        check_blob_name(name)
                    except InvalidField:  # a "folder" below this one: not a blob in it
                        continue
                    yield BlobStat(name, entry["Size"], entry["LastModified"])
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(action, exc) from exc

    def _head(self, key: str, action: str) -> HeadObjectOutputTypeDef | None:
        """The HEAD of ``key``, or ``None`` when there is no such object."""
        try:
            return self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise self._unavailable(action, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(action, exc) from exc

    def _copy_new(self, source: str, target: str, name: str, action: str) -> None:
        """Copy ``source`` to ``target``, which must not exist (checked by the endpoint too
        where it takes ``If-None-Match``)."""
        copy_source: CopySourceTypeDef = {"Bucket": self.bucket, "Key": source}
        try:
            if self._conditional_put:
                self._client.copy_object(
                    Bucket=self.bucket, Key=target, CopySource=copy_source, IfNoneMatch="*"
                )
            else:
                self._client.copy_object(Bucket=self.bucket, Key=target, CopySource=copy_source)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING_CODES:
                raise KeyNotFound(f"no blob {name!r}") from exc
            if code in _EXISTS_CODES:
                raise KeyExists(f"the quarantine already holds a blob named {name!r}") from exc
            if code not in _UNSUPPORTED_CODES or not self._conditional_put:
                raise self._unavailable(action, exc) from exc
            self._conditional_put = False
            self._call(
                action,
                self._client.copy_object,
                Bucket=self.bucket,
                Key=target,
                CopySource=copy_source,
            )
        except BotoCoreError as exc:
            raise self._unavailable(action, exc) from exc

    def check_health(self) -> None:
        self._call("reach the bucket", self._client.head_bucket, Bucket=self.bucket)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _key(self, name: str) -> str:
        return self.prefix + check_blob_name(name)

    def _put_if_absent(self, name: str, key: str, data: bytes) -> None:
        """HEAD then PUT, for endpoints without conditional writes."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES:
                raise self._unavailable(f"write blob {name!r}", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(f"write blob {name!r}", exc) from exc
        else:
            raise KeyExists(f"blob {name!r} already exists")
        self._call(
            f"write blob {name!r}", self._client.put_object, Bucket=self.bucket, Key=key, Body=data
        )

    def _call(self, action: str, method: Any, **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(action, exc) from exc

    def _unavailable(self, action: str, exc: ClientError | BotoCoreError) -> DependencyUnavailable:
        reason = (
            (_error_code(exc) or "error") if isinstance(exc, ClientError) else type(exc).__name__
        )
        return DependencyUnavailable(f"S3 bucket {self.bucket!r}: cannot {action}: {reason}")
