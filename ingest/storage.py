"""Object storage: read and write files and Parquet under a URI, a local path or ``s3://bucket/prefix``.

Everything in danmul that touches datasets, checkpoints, archives or results goes through
:class:`Storage`, so a folder on disk and a bucket behave the same.

S3 works with AWS and with any S3-compatible store (MinIO, Ceph, moto): the endpoint comes from the
``endpoint_url`` argument, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials and region
come from the standard AWS chain (environment, ``~/.aws``, instance or pod identity), never from code.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


class NotFound(StorageError, FileNotFoundError):
    """The object or file does not exist."""


class TooLarge(StorageError):
    """The object is larger than the caller's limit (nothing past the limit was read)."""


@dataclass(frozen=True)
class FileEntry:
    """One file found by :meth:`Storage.list`: its path relative to the listed prefix, and size."""

    path: str
    size: int


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def s3_filesystem(endpoint_url: str | None = None, *, connect_timeout_s: float | None = None,
                  stall_timeout_s: float | None = None, attempts: int | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for AWS or an S3-compatible endpoint (explicit, else from the environment).

    Unset, the AWS SDK's own bounds apply (connect 1 s, stall 3 s, 3 attempts per request).
    ``stall_timeout_s`` is pyarrow's ``request_timeout``: its docs call it Windows and macOS only, but on
    Linux the SDK's curl client takes it as its low-speed time (measured with pyarrow 26: an endpoint
    that accepts the connection and never answers fails after it, "Less than 1 bytes/sec transferred the
    last 1 seconds"). It bounds silence, not slowness: an answer that trickles in at 1 byte/s or more
    is never cut by it."""
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    kwargs: dict = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
        # Self-hosted stores (MinIO, Ceph, moto) address buckets by path, not by virtual host.
        kwargs["force_virtual_addressing"] = False
    if connect_timeout_s is not None:
        kwargs["connect_timeout"] = connect_timeout_s
    if stall_timeout_s is not None:
        kwargs["request_timeout"] = stall_timeout_s
    if attempts is not None:
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint_url: str | None = None, **s3_options) -> tuple[pafs.FileSystem, str]:
    """Split a URI into a pyarrow filesystem and the path inside it (no trailing slash); ``s3_options`` go to
    :func:`s3_filesystem` for an s3:// URI."""
    if not uri:
        raise ValueError("empty storage URI")
    if is_s3(uri):
        path = uri[len(S3_SCHEME) :].strip("/")
        if not path:
            raise ValueError(f"S3 URI needs a bucket: {uri!r}")
        return s3_filesystem(endpoint_url, **s3_options), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri).rstrip("/") or "/"


class Storage:
    """A root URI and the operations danmul needs under it. Paths given to methods are relative.
    ``s3_options``: the S3 client's time bounds (see :func:`s3_filesystem`)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, **s3_options):
        self.uri = uri.rstrip("/") if uri not in ("/", S3_SCHEME) else uri
        self.endpoint_url, self.s3_options = endpoint_url, s3_options
        self.fs, self.root = resolve(uri, endpoint_url, **s3_options)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # -- naming -------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what pyarrow and Ray Data take with ``filesystem=self.fs``)."""
        rel = rel.strip("/")
        return posixpath.join(self.root, rel) if rel else self.root

    def uri_of(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return f"{self.uri}/{rel}" if rel else self.uri

    def child(self, rel: str) -> Storage:
        return Storage(self.uri_of(rel), self.endpoint_url, **self.s3_options)

    # -- reading ------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str = "") -> bool:
        return self._info(rel).type == pafs.FileType.File

    def size(self, rel: str) -> int:
        info = self._info(rel)
        if info.type != pafs.FileType.File:
            raise NotFound(f"no such file: {self.uri_of(rel)}")
        return info.size

    def read_bytes(self, rel: str = "", max_bytes: int | None = None) -> bytes:
        """The whole object; with ``max_bytes``, refuse (StorageError) anything larger."""
        try:
            # Local files: plain open() is several times faster than a pyarrow stream per small file.
            with open(self.path(rel), "rb") if self.local else self.fs.open_input_stream(self.path(rel)) as f:
                if max_bytes is None:
                    return f.read()
                data = f.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFound(f"no such file: {self.uri_of(rel)}") from e
        except OSError as e:
            raise self._error("read", rel, e) from e
        if len(data) > max_bytes:
            raise TooLarge(f"{self.uri_of(rel)} is larger than the {max_bytes}-byte limit")
        return data

    def read_text(self, rel: str = "") -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open_lines(self, rel: str = "") -> Iterator[bytes]:
        """Stream a text file line by line (bytes, newline stripped); ``.gz``/``.zst``/``.bz2`` decompress.

        Memory stays bounded by the longest line, whatever the file's size.
        """
        try:
            stream = self.fs.open_input_stream(self.path(rel), compression="detect")
        except FileNotFoundError as e:
            raise NotFound(f"no such file: {self.uri_of(rel)}") from e
        with stream, io.BufferedReader(_RawAdapter(stream), buffer_size=1 << 20) as reader:
            for line in reader:
                yield line.rstrip(b"\r\n")

    def list(self, rel: str = "", recursive: bool = True, suffixes: tuple[str, ...] = ()) -> list[FileEntry]:
        """Files under ``rel`` (sorted, paths relative to ``rel``); an absent prefix lists nothing."""
        base = self.path(rel)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise self._error("list", rel, e) from e
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            sub = info.path[len(base) :].lstrip("/") if info.path.startswith(base) else info.base_name
            if suffixes and not sub.endswith(suffixes):
                continue
            out.append(FileEntry(sub, info.size))
        out.sort(key=lambda e: e.path)
        return out

    def read_parquet(self, rel: str = "", columns: list[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)
        except FileNotFoundError as e:
            raise NotFound(f"no such file: {self.uri_of(rel)}") from e

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        """An open Parquet file, for reading metadata or one row group at a time."""
        return pq.ParquetFile(self.fs.open_input_file(self.path(rel)))

    # -- writing ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object. Readers never see a partial file (S3 PUT is atomic; locally we
        write a temporary file and rename it)."""
        target = self.path(rel)
        try:
            if self.local:
                os.makedirs(posixpath.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            else:
                with self.fs.open_output_stream(target, compression=None) as f:
                    f.write(data)
        except OSError as e:
            raise self._error("write", rel, e) from e

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def open_output(self, rel: str) -> pa.NativeFile:
        """A writable stream (for incremental writers such as ``pq.ParquetWriter``)."""
        target = self.path(rel)
        if self.local:
            os.makedirs(posixpath.dirname(target), exist_ok=True)
        return self.fs.open_output_stream(target, compression=None)

    def write_parquet(self, rel: str, table: pa.Table, **kwargs) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **kwargs)
        self.write_bytes(rel, sink.getvalue().to_pybytes())

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def delete_prefix(self, rel: str) -> None:
        """Remove everything under ``rel`` (a folder or an S3 prefix)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)

    # -- helpers ------------------------------------------------------------------------------
    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(rel))
        except OSError as e:
            raise self._error("stat", rel, e) from e

    def _error(self, op: str, rel: str, e: Exception) -> StorageError:
        return StorageError(f"cannot {op} {self.uri_of(rel)}: {e}")


class _RawAdapter(io.RawIOBase):
    """Lets :class:`io.BufferedReader` iterate lines over a pyarrow input stream."""

    def __init__(self, stream: pa.NativeFile):
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._stream.read(len(buf))
        n = len(data)
        buf[:n] = data
        return n
