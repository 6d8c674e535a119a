"""Fetching an upload's image by URI, with the rules untrusted input needs.

- ``s3://bucket/key``: object storage (endpoint and credentials as in :mod:`ingest.storage`).
- a local path (or ``file://``): only under one of the configured roots, after resolving symlinks
  and ``..``; anything else is ``forbidden_path``. No roots configured: no local paths at all.
- ``http(s)://``: off unless enabled (a tagger that fetches any URL it is given is an SSRF hole).

Permanent failures raise :class:`ingest.queue.BadUpload` with a reason code; failures worth a retry
(a storage error, a timeout) raise :class:`FetchRetry`. Every read is capped at ``max_bytes``.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence

from ingest.queue import FORBIDDEN_PATH, NOT_FOUND, UNSUPPORTED_URI, BadUpload
from ingest.storage import NotFound, Storage, StorageError, TooLarge, is_s3

HTTP_TIMEOUT_S = 10.0


class FetchRetry(RuntimeError):
    """A failure that may pass (storage or network trouble): leave the upload for another delivery."""


class ImageFetcher:
    def __init__(self, local_roots: Sequence[str] = (), allow_http: bool = False, endpoint_url: str | None = None,
                 max_bytes: int = 32 << 20):
        self.roots = [os.path.realpath(r) for r in local_roots]
        self.allow_http, self.endpoint_url, self.max_bytes = allow_http, endpoint_url, max_bytes
        self._buckets: dict[str, Storage] = {}  # one filesystem client per bucket, reused
        self._lock = threading.Lock()

    def fetch(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, _, key = uri[len("s3://") :].partition("/")
            if not bucket or not key:
                raise BadUpload(UNSUPPORTED_URI, f"{uri[:200]!r} names no object")
            return self._read(self._bucket(bucket), key, uri)
        if uri.startswith(("http://", "https://")):
            return self._http(uri)
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if "://" in uri:
            raise BadUpload(UNSUPPORTED_URI, f"scheme of {uri[:200]!r}")
        return self._local(uri)

    def _bucket(self, bucket: str) -> Storage:
        with self._lock:
            if bucket not in self._buckets:
                self._buckets[bucket] = Storage(f"s3://{bucket}", self.endpoint_url)
            return self._buckets[bucket]

    def _read(self, storage: Storage, rel: str, uri: str) -> bytes:
        try:
            return storage.read_bytes(rel, max_bytes=self.max_bytes)
        except NotFound:
            raise BadUpload(NOT_FOUND, uri[:200]) from None
        except TooLarge:
            raise BadUpload("too_large", f"{uri[:200]} is over {self.max_bytes} bytes") from None
        except (StorageError, OSError) as e:
            raise FetchRetry(f"{uri[:200]}: {e}") from e

    def _local(self, path: str) -> bytes:
        if not self.roots:
            raise BadUpload(FORBIDDEN_PATH, "local paths are not enabled (no --local-roots)")
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots):
            raise BadUpload(FORBIDDEN_PATH, f"{path[:200]!r} is outside the allowed roots")
        if not os.path.isfile(real):
            raise BadUpload(NOT_FOUND, path[:200])
        try:
            with open(real, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except OSError as e:
            raise FetchRetry(f"{path[:200]}: {e}") from e
        if len(data) > self.max_bytes:
            raise BadUpload("too_large", f"{path[:200]} is over {self.max_bytes} bytes")
        return data

    def _http(self, url: str) -> bytes:
        if not self.allow_http:
            raise BadUpload(UNSUPPORTED_URI, "http(s) fetching is off (--allow-http to enable)")
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
                data = resp.read(self.max_bytes + 1)
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise BadUpload(NOT_FOUND, url[:200]) from None
            if 400 <= e.code < 500:
                raise BadUpload(UNSUPPORTED_URI, f"HTTP {e.code} for {url[:200]}") from None
            raise FetchRetry(f"HTTP {e.code} for {url[:200]}") from e
        except (urllib.error.URLError, OSError) as e:
            raise FetchRetry(f"{url[:200]}: {e}") from e
        if len(data) > self.max_bytes:
            raise BadUpload("too_large", f"{url[:200]} is over {self.max_bytes} bytes")
        return data
