"""Fetching an upload's image by URI, with the rules untrusted input needs.

Cheap checks come before costly ones, and nothing touches a filesystem or a network before the URI has
passed them: first its length (:data:`MAX_URI_CHARS`, else ``uri_too_long``), before anything parses it;
then its characters (a NUL or another control character: ``unsupported_uri``); then the scheme's own
rules, below. One deadline covers each fetch (``timeout_s``, :data:`FETCH_TIMEOUT_S` unless set; or the
caller's ``deadline``): past it the fetch raises :class:`FetchRetry` with reason ``fetch_timeout``.

- ``s3://bucket/key``: object storage (endpoint and credentials as in :mod:`ingest.storage`), only in the
  allowed buckets (``allowed_buckets``; see :func:`default_allowed_buckets`): any other bucket is
  ``forbidden_bucket``, so an upload cannot probe every bucket the credentials reach. A key with an empty,
  ``.`` or ``..`` path segment is refused (``s3://allowed/../other/key`` would otherwise reach ``other``
  through a path-style endpoint).
  A key over 1024 bytes (S3's own limit) is ``uri_too_long``. The S3 client's connect and stall
  timeouts and its attempts per request are set from the deadline (:func:`s3_client_bounds`), and the
  deadline is checked between reads of at most :data:`S3_READ_CHUNK` bytes; an object over ``max_bytes``
  is refused from its size, before its body is read.
- a local path (or ``file://``): only under one of the configured roots. Checked in this order: its
  length (PATH_MAX), its number of components and the length of each (NAME_MAX), all
  ``uri_too_long``; then, without a system call, whether the normalised path lies under a root (as
  configured or resolved); only then is it resolved (symlinks, ``..``) and checked again. Anything
  outside is ``forbidden_path``. Only a regular file is opened (a FIFO, a device or a folder is
  ``not_found``, refused from its ``stat`` before any ``open``), with ``O_NONBLOCK`` and ``O_NOFOLLOW``,
  and checked again on the open descriptor; it is read in chunks with the deadline checked between them.
  No roots configured: no local paths at all.
- ``http(s)://``: off unless enabled (a tagger that fetches any URL it is given is an SSRF hole). When on,
  the host is resolved once and only a public address is connected to (private, loopback, link-local,
  multicast, reserved and unspecified ones, IPv4 and IPv6, IPv4-mapped or embedded, are
  ``forbidden_address``); the request goes to the address that was checked, with the URL's host in the
  ``Host`` header and, for https, in SNI and certificate verification, so a DNS answer that changes
  between the check and the connection cannot redirect it. At most :data:`MAX_REDIRECTS` redirects, each
  target checked the same way. The fetch's deadline covers all of it (connect, TLS, headers, body, every
  redirect), not each read: a server that trickles bytes cannot hold a fetch longer than that. Environment
  proxies are not used (a proxy would resolve the name itself, past the check). Name resolution itself is
  bounded by the system resolver's own timeouts (``/etc/resolv.conf``: 5 s per try by default), not by
  the deadline.

What the deadline cannot stop inside the calling thread (a thread cannot be killed): a read from a
hard-mounted network filesystem that stopped answering blocks in the kernel until the mount answers; an
S3 endpoint that answers, but at 1 byte/s or more, is cut only between reads of :data:`S3_READ_CHUNK`
bytes; name resolution, as above. A caller that must not wait past the deadline (the streaming consumer)
stops waiting for the thread at the deadline and releases the upload.

Permanent failures raise :class:`ingest.queue.BadUpload` with a reason code; failures that may pass
raise :class:`FetchRetry`. Every read is capped at ``max_bytes``.

Reason codes added here (beside those of :mod:`ingest.queue`, whose block they belong to):
``forbidden_bucket`` (an S3 bucket outside the allowed ones, or one that refuses access: AccessDenied),
``forbidden_address`` (an http(s) target that is not a public address) and ``uri_too_long`` (over a
length limit of the URI, an S3 key, a path or a path component). A :class:`FetchRetry` names why the
upload is left pending: ``fetch_timeout`` (the deadline passed) or ``fetch_error`` (anything else).

How S3 errors are classified: pyarrow's S3 filesystem reads an object with HeadObject, then GetObject. A
404 to the HEAD (no such key, no such bucket; moto also answers 404 for a name that is not a valid
bucket) raises ``FileNotFoundError``; anything else an ``OSError`` whose message reads ``AWS Error <TYPE>
[(HTTP status <code>)] during <Operation> operation: ...``, e.g. ``AWS Error ACCESS_DENIED during
HeadObject operation`` (a bucket policy's Deny, in moto as in AWS), ``AWS Error UNKNOWN (HTTP status
503)``, ``AWS Error NETWORK_CONNECTION`` (nothing listens at the endpoint). :func:`s3_error_reason`
reads that type and status:

- access denied (ACCESS_DENIED, HTTP 403): ``forbidden_bucket``; missing (NO_SUCH_BUCKET, NO_SUCH_KEY,
  RESOURCE_NOT_FOUND, HTTP 404/410, a "key" that is a prefix): ``not_found``; any other 3xx/4xx answer
  (a bucket in another region, a request S3 rejects): ``unsupported_uri``. Permanent.
- connection errors, timeouts, throttling (SLOW_DOWN, THROTTLING, HTTP 429, 408), 5xx
  (SERVICE_UNAVAILABLE, INTERNAL_FAILURE), errors S3 names as the tagger's own credentials' or clock's
  (INVALID_ACCESS_KEY_ID, SIGNATURE_DOES_NOT_MATCH, REQUEST_TIME_TOO_SKEWED...: the deployment's fault,
  not the upload's), and anything not recognised: :class:`FetchRetry` (the queue's delivery limit bounds
  those).

A limit to know: a HEAD answer has no body, so S3's 403 to it says only "403", the same for a denied
bucket and for credentials S3 rejects (expired, revoked); both read as ACCESS_DENIED and end as
``forbidden_bucket``. Credentials that stop working therefore dead-letter S3 uploads (the dead letters keep
the fields, for a replay) instead of leaving them pending.
"""

from __future__ import annotations

import errno
import http.client
import io
import ipaddress
import os
import re
import select
import socket
import ssl
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from urllib.parse import quote, urljoin, urlsplit

from ingest.queue import FORBIDDEN_PATH, NOT_FOUND, UNSUPPORTED_URI, BadUpload
from ingest.storage import Storage, is_s3

# Reason codes of this module (dead letters and backfill error rows), beside ingest.queue's.
FORBIDDEN_BUCKET = "forbidden_bucket"
FORBIDDEN_ADDRESS = "forbidden_address"
TOO_LARGE = "too_large"  # the same code as model.preprocess.ImageError's
URI_TOO_LONG = "uri_too_long"
# Why a FetchRetry leaves its upload pending (the attempts hash, danmul_upload_retries_total's reason).
FETCH_ERROR = "fetch_error"
FETCH_TIMEOUT = "fetch_timeout"

# The whole of one fetch, whatever the scheme (http(s): redirects included). The default of the tagger's and
# the backfill's --fetch-timeout-s (deploy.settings and ray_jobs.backfill keep their own copy, to stay light
# to import; a unit test holds them equal).
FETCH_TIMEOUT_S = 10.0
# The longest URI looked at, in characters, checked before anything parses it. An http(s) URL in practice
# is at most a few KB (signed URLs with session tokens run to 2-3 KB; servers refuse request lines over
# 8 KiB: nginx's large_client_header_buffers, Apache's LimitRequestLine). The other schemes have tighter
# limits of their own, checked next: an s3:// URI is at most 5 + 255 + 1 + 1024 bytes, a local path at most
# PATH_MAX - 1 bytes.
MAX_URI_CHARS = 8192
MAX_S3_KEY_BYTES = 1024  # S3's own limit on a key: a longer one cannot exist
MAX_PATH_BYTES = 4095  # Linux's PATH_MAX (4096) less the NUL: open() refuses a longer path (ENAMETOOLONG)
MAX_NAME_BYTES = 255  # Linux's NAME_MAX: no file name on its filesystems is longer
# Components of a local path (``/a/b`` has two), before it is resolved: resolving costs a system call per
# component, and its time grew faster than quadratically with them (2026-12-04, 2-core machine: 1.6 s for
# 131,072 components, 61 s for 524,288; 256 take under 1 ms). PATH_MAX alone allows 2,048. Upload folders
# are a few levels deep; 256 leaves the roots room of their own.
MAX_PATH_COMPONENTS = 256
LOCAL_READ_CHUNK = 1 << 20  # a local file is read in chunks this large, the deadline checked between them
S3_READ_CHUNK = 8 << 20  # an object's body is read in ranged GETs this large (an image in one, 32 MiB in four)
S3_ATTEMPTS = 2  # tries per S3 request (the SDK's default is 3): a third would not fit in the deadline
MAX_REDIRECTS = 3
MAX_BUCKET_CLIENTS = 16  # S3 clients kept, one per bucket, least recently used dropped first
ANY_BUCKET = "*"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL: in no URI or path a platform writes
_AWS_ERROR_RE = re.compile(r"AWS Error (?P<type>[A-Z_]+|\[code \d+\])(?: \(HTTP status (?P<status>\d+)\))?")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_S3_FORBIDDEN = {"ACCESS_DENIED"}
_S3_MISSING = {"NO_SUCH_BUCKET", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND"}
_S3_TRANSIENT = {
    "NETWORK_CONNECTION", "REQUEST_TIMEOUT", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
    # the tagger's own credentials or clock: fixed by the operator, not by the upload
    "REQUEST_EXPIRED", "REQUEST_TIME_TOO_SKEWED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
    "INVALID_SIGNATURE", "UNRECOGNIZED_CLIENT", "INVALID_CLIENT_TOKEN_ID", "MISSING_AUTHENTICATION_TOKEN",
    "INCOMPLETE_SIGNATURE",
}  # fmt: skip


class FetchRetry(RuntimeError):
    """A failure that may pass (storage or network trouble): leave the upload for another delivery.
    ``reason``: :data:`FETCH_TIMEOUT` when the fetch's deadline passed, else :data:`FETCH_ERROR`.
    ``unreachable`` names the store when nothing answered at all (S3's endpoint refused the connection or
    its name did not resolve, after the client's own retries): its other objects will not answer now
    either, so a caller with many to fetch may leave them for later without waiting on each."""

    def __init__(self, message: str, unreachable: str | None = None, reason: str = FETCH_ERROR):
        super().__init__(message)
        self.unreachable, self.reason = unreachable, reason


def s3_client_bounds(timeout_s: float) -> dict:
    """The S3 client's time bounds for fetches with a deadline ``timeout_s`` away (options of
    :func:`ingest.storage.s3_filesystem`). A fetch makes two requests (HEAD, then ranged GETs), each tried
    :data:`S3_ATTEMPTS` times; connect and stall timeouts of a quarter of the deadline each keep an
    endpoint that drops the connection or never answers within it (10 s: 2.5 s each, near the SDK's own
    1 s and 3 s). The client counts a stall in whole seconds, at least one (measured 2026-12-04, an endpoint
    that never answers: 4.9 s to give up at a 10 s deadline, 2.4 s at 4 s, 2.7 s at 1 s): below about 4 s
    it may overrun the deadline by a second or two; the caller's wait ends at the deadline regardless."""
    share = timeout_s / (2 * S3_ATTEMPTS)
    return {"connect_timeout_s": share, "stall_timeout_s": share, "attempts": S3_ATTEMPTS}


def store_of(uri: str) -> str | None:
    """The store :attr:`FetchRetry.unreachable` names for ``uri``: its bucket (on AWS each bucket has a
    host name of its own), or None for anything but S3."""
    return "s3://" + uri[len("s3://"):].partition("/")[0] if is_s3(uri) else None


def _aws_error(chain: list[BaseException]) -> re.Match | None:
    """The AWS error an S3 read error reports (its :func:`_chain`): the innermost message's last ``AWS
    Error TYPE`` (the bucket and key come before it in the message, and a key may spell anything)."""
    for e in reversed(chain):
        matches = list(_AWS_ERROR_RE.finditer(str(e)))
        if matches:
            return matches[-1]
    return None


_CONNECT_FAILED_RE = re.compile(r" during \w+ operation: curlCode: (6|7)\b")  # could not resolve, could not connect


def s3_timed_out(error: BaseException) -> bool:
    """Whether an S3 read error is the client's own timeout (curl's 28: nothing arrived for the stall
    timeout, or the connection was not made within the connect timeout)."""
    m = _aws_error(_chain(error))
    return m is not None and re.match(r" during \w+ operation: curlCode: 28\b", m.string[m.end():]) is not None


def s3_unreachable(error: BaseException) -> bool:
    """Whether an S3 read error says nothing answered at all: the connection could not be made (curl's
    6, name not resolved, or 7, refused). Not a timeout, a connection cut mid-answer or a TLS failure,
    which S3's client also reports as NETWORK_CONNECTION but which may be one object's trouble."""
    m = _aws_error(_chain(error))
    return (m is not None and m.group("type") == "NETWORK_CONNECTION"
            and _CONNECT_FAILED_RE.match(m.string, m.end()) is not None)


def default_allowed_buckets(checkpoint_uri: str, listed: str) -> set[str] | None:
    """The buckets uploads may name, from the comma-separated setting ``listed``.

    - ``*`` (alone or among others): None, any bucket the credentials reach (the old behaviour; only for
      deployments whose credentials reach nothing an upload must not read).
    - empty: the checkpoint's bucket if the checkpoint is on S3 (a deployment reads it already, and the
      small setups that keep uploads beside the model work unconfigured), else no bucket at all (no s3://
      uploads until buckets are listed).
    - otherwise: the listed buckets plus the checkpoint's (when on S3).

    Allowing the checkpoint's bucket leaks nothing: what an upload makes the tagger fetch is decoded as an
    image, never returned, so the model's own files only yield ``not_an_image``. Entries may be written as
    ``name`` or ``s3://name``; a prefix (``s3://name/path``) is refused with ValueError: the allowance is per
    bucket.
    """
    names = set()
    for raw in listed.split(","):
        name = raw.strip()
        if name.startswith("s3://"):
            name = name[len("s3://") :].rstrip("/")
        if not name:
            continue
        if name == ANY_BUCKET:
            return None
        if "/" in name:
            raise ValueError(f"allowed buckets are bucket names, not prefixes: {raw.strip()!r}")
        names.add(name)
    if is_s3(checkpoint_uri):
        bucket = checkpoint_uri[len("s3://") :].partition("/")[0]
        if bucket:
            names.add(bucket)
    return names


def valid_bucket_name(name: str) -> bool:
    """Whether ``name`` can be an S3 bucket: 3-255 of ``A-Z a-z 0-9 . _ -`` (today's rules are stricter, 3-63
    of ``a-z 0-9 . -``, but old us-east-1 buckets have capitals, ``_`` and longer names, and the backfill
    reads any bucket), a letter or digit at both ends, no ``..``, not an IPv4 address."""
    if not _BUCKET_RE.match(name) or ".." in name:
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return True
    return False


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it (StorageError wraps pyarrow's OSError), five at most."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def s3_error_reason(error: BaseException) -> str | None:
    """The permanent reason code of an S3 read error, or None when it may pass (see the module's notes)."""
    chain = _chain(error)
    if any(isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError) for e in chain):
        return NOT_FOUND
    text = " | ".join(str(e) for e in chain)
    m = _aws_error(chain)
    if m is None:
        return NOT_FOUND if "Not a regular file" in text else None  # a prefix named as a key
    kind, status = m.group("type"), int(m.group("status") or 0)  # a status is shown for UNKNOWN types only
    if kind in _S3_FORBIDDEN or status == 403:
        return FORBIDDEN_BUCKET
    if kind in _S3_MISSING or status in (404, 410):
        return NOT_FOUND
    if status in (408, 429) or status >= 500 or kind in _S3_TRANSIENT:
        return None
    if 300 <= status < 500:
        return UNSUPPORTED_URI  # e.g. 301 (the bucket is in another region) or 400 (S3 rejects the request)
    return None  # anything unrecognised: may pass (the queue's delivery limit bounds it)


def address_forbidden(ip: IPAddress, allow_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
                      ) -> bool:
    """Whether an http(s) fetch must not connect to ``ip``: anything but a public unicast address, unless
    ``allow_networks`` holds it. IPv4 inside IPv6 (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4,
    Teredo) is judged by the IPv4 address too."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    nets = list(allow_networks)
    if any(ip.version == n.version and ip in n for n in nets):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [a for a in (ip.sixtofour, *(ip.teredo or ())) if a is not None]
        if any(address_forbidden(a, nets) for a in embedded) or ip.is_site_local:
            return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


class ImageFetcher:
    """Fetches an upload's image by URI under the module's rules.

    ``allowed_buckets``: the s3:// buckets that may be read (None, or a collection holding ``*``: any);
    ``http_allow_networks``: CIDRs an http(s) fetch may reach although they are not public (tests, or an
    image server on a private network the operator vouches for); ``timeout_s``: the total time of one
    fetch, whatever its scheme; ``ssl_context``: how https certificates are verified (default: the
    system's CAs)."""

    def __init__(self, local_roots: Sequence[str] = (), allow_http: bool = False, endpoint_url: str | None = None,
                 max_bytes: int = 32 << 20, *, allowed_buckets: Collection[str] | None = None,
                 http_allow_networks: Sequence[str] = (), timeout_s: float = FETCH_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None):
        if not 0 < timeout_s < float("inf"):
            raise ValueError(f"the fetch timeout must be a positive number of seconds, not {timeout_s!r}")
        self.roots = [os.path.realpath(r) for r in local_roots]
        # the roots as a path names them before it is resolved: as configured, and resolved (a root reached
        # through a symlink may be named either way)
        self.named_roots = list(dict.fromkeys([os.path.abspath(r) for r in local_roots] + self.roots))
        self.allow_http, self.endpoint_url, self.max_bytes = allow_http, endpoint_url, max_bytes
        self.allowed_buckets = None if allowed_buckets is None or ANY_BUCKET in allowed_buckets else frozenset(
            allowed_buckets)
        self.http_allow_networks = [ipaddress.ip_network(n, strict=False) for n in http_allow_networks]
        self.timeout_s = timeout_s
        # made once (loading the system's CAs per fetch would cost more than many fetches)
        self.ssl_context = ssl_context or (ssl.create_default_context() if allow_http else None)
        self._buckets: OrderedDict[str, Storage] = OrderedDict()  # one S3 client per bucket, bounded LRU
        self._lock = threading.Lock()

    def fetch(self, uri: str, deadline: float | None = None) -> bytes:
        """The image ``uri`` names. ``deadline``: a :func:`time.monotonic` time to give up at (default:
        ``timeout_s`` from now); a caller that also waits with a timeout passes the one it waits for, so
        the thread gives up when the caller does."""
        if len(uri) > MAX_URI_CHARS:  # first: everything after this is linear in the length at most
            raise BadUpload(URI_TOO_LONG, f"{len(uri):,} characters, over {MAX_URI_CHARS:,}: {uri[:100]!r}...")
        control = _CONTROL_RE.search(uri)
        if control:
            what = "a NUL byte" if control.group() == "\0" else f"a control character ({control.group()!r})"
            raise BadUpload(UNSUPPORTED_URI, f"{what} at {control.start()} in {uri[:200]!r}")
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        if is_s3(uri):
            return self._s3(uri, deadline)
        if uri.startswith(("http://", "https://")):
            return self._http(uri, deadline)
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if "://" in uri:
            raise BadUpload(UNSUPPORTED_URI, f"scheme of {uri[:200]!r}")
        return self._local(uri, deadline)

    def _in_time(self, deadline: float, uri: str) -> None:
        if time.monotonic() >= deadline:
            raise FetchRetry(f"{uri[:200]}: not fetched within {self.timeout_s:g} s", reason=FETCH_TIMEOUT)

    # -- s3 -----------------------------------------------------------------------------------------------
    def _s3(self, uri: str, deadline: float) -> bytes:
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket or not key:
            raise BadUpload(UNSUPPORTED_URI, f"{uri[:200]!r} names no object")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_S3_KEY_BYTES:
            raise BadUpload(URI_TOO_LONG, f"{uri[:200]!r}: a key over S3's {MAX_S3_KEY_BYTES} bytes")
        if self.allowed_buckets is not None:
            if bucket not in self.allowed_buckets:
                raise BadUpload(FORBIDDEN_BUCKET, f"bucket {bucket[:70]!r} is not one uploads may name")
        elif not valid_bucket_name(bucket):
            raise BadUpload(UNSUPPORTED_URI, f"{bucket[:70]!r} is not a valid S3 bucket name")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise BadUpload(UNSUPPORTED_URI, f"{uri[:200]!r}: empty, '.' or '..' path segment in the key")
        self._in_time(deadline, uri)
        return self._s3_read(self._bucket(bucket), key, uri, deadline)

    def _bucket(self, bucket: str) -> Storage:
        with self._lock:
            storage = self._buckets.get(bucket)
            if storage is None:
                storage = self._buckets[bucket] = Storage(f"s3://{bucket}", self.endpoint_url,
                                                          **s3_client_bounds(self.timeout_s))
                while len(self._buckets) > MAX_BUCKET_CLIENTS:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(bucket)
            return storage

    def _s3_read(self, storage: Storage, key: str, uri: str, deadline: float) -> bytes:
        """The object's size from its HEAD (refused over ``max_bytes`` before any GET), then its body in
        ranged GETs of :data:`S3_READ_CHUNK`, the deadline checked before each."""
        try:
            with storage.fs.open_input_file(storage.path(key)) as f:
                size = f.size()
                if size > self.max_bytes:
                    raise BadUpload(TOO_LARGE, f"{uri[:200]} is over {self.max_bytes} bytes")
                chunks, got = [], 0
                while got < size:
                    self._in_time(deadline, uri)
                    chunk = f.read(min(S3_READ_CHUNK, size - got))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                return b"".join(chunks)
        except (BadUpload, FetchRetry):
            raise
        except OSError as e:
            reason = s3_error_reason(e)
            if reason is not None:
                raise BadUpload(reason, f"{uri[:200]}: {str(e)[:300]}") from None
            raise FetchRetry(f"{uri[:200]}: {e}", store_of(uri) if s3_unreachable(e) else None,
                             FETCH_TIMEOUT if s3_timed_out(e) else FETCH_ERROR) from e
        except ValueError as e:  # pyarrow.ArrowInvalid: a path pyarrow cannot address
            raise BadUpload(UNSUPPORTED_URI, f"{uri[:200]}: {str(e)[:300]}") from None

    # -- local --------------------------------------------------------------------------------------------
    def _local(self, path: str, deadline: float) -> bytes:
        """The cheap checks (``fetch`` did length and characters) in order of cost, each before the next:
        no system call until the path is known to be short, shallow and, as written, under a root."""
        if not self.roots:
            raise BadUpload(FORBIDDEN_PATH, "local paths are not enabled (no --local-roots)")
        try:
            raw = os.fsencode(path)
        except UnicodeEncodeError:
            raise BadUpload(UNSUPPORTED_URI, f"{path[:200]!r} cannot be a file name") from None
        if len(raw) > MAX_PATH_BYTES:
            raise BadUpload(URI_TOO_LONG, f"a path of {len(raw):,} bytes, over PATH_MAX: {path[:100]!r}...")
        names = [n for n in raw.split(b"/") if n]
        if len(names) > MAX_PATH_COMPONENTS:
            raise BadUpload(URI_TOO_LONG, f"{len(names):,} path components, over {MAX_PATH_COMPONENTS}: "
                                          f"{path[:100]!r}...")
        if any(len(n) > MAX_NAME_BYTES for n in names):
            raise BadUpload(URI_TOO_LONG, f"a path component over NAME_MAX ({MAX_NAME_BYTES} bytes): {path[:100]!r}")
        if not _under(os.path.abspath(path), self.named_roots):  # lexical: the path as written, normalised
            raise BadUpload(FORBIDDEN_PATH, f"{path[:200]!r} is outside the allowed roots")
        real = os.path.realpath(path)  # symlinks and '..' resolved: what the path really names
        if not _under(real, self.roots):
            raise BadUpload(FORBIDDEN_PATH, f"{path[:200]!r} is outside the allowed roots")
        return self._read_file(real, path, deadline)

    def _read_file(self, real: str, path: str, deadline: float) -> bytes:
        """A regular file, refused otherwise before it is opened (opening a FIFO waits for a writer; a
        device may do anything), then checked again on the open descriptor (the path may have changed in
        between), read in chunks with the deadline checked between them."""
        try:
            info = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            raise BadUpload(NOT_FOUND, path[:200]) from None
        except OSError as e:
            raise FetchRetry(f"{path[:200]}: {e}") from e
        if not stat.S_ISREG(info.st_mode):
            raise BadUpload(NOT_FOUND, f"{path[:200]}: not a regular file")
        if info.st_size > self.max_bytes:
            raise BadUpload(TOO_LARGE, f"{path[:200]} is over {self.max_bytes} bytes")
        try:
            # O_NONBLOCK: should a FIFO be swapped in after the stat, the open does not wait for a writer;
            # O_NOFOLLOW: nor does it follow a symlink swapped in for the resolved file
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise BadUpload(NOT_FOUND, path[:200]) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BadUpload(FORBIDDEN_PATH, f"{path[:200]!r} became a symlink") from None
            raise FetchRetry(f"{path[:200]}: {e}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadUpload(NOT_FOUND, f"{path[:200]}: not a regular file")
            chunks, size = [], 0
            while True:
                self._in_time(deadline, path)
                chunk = os.read(fd, min(LOCAL_READ_CHUNK, self.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:  # it grew since the stat
                    raise BadUpload(TOO_LARGE, f"{path[:200]} is over {self.max_bytes} bytes")
            return b"".join(chunks)
        except OSError as e:
            raise FetchRetry(f"{path[:200]}: {e}") from e
        finally:
            os.close(fd)

    # -- http(s) ------------------------------------------------------------------------------------------
    def _http(self, url: str, deadline: float) -> bytes:
        if not self.allow_http:
            raise BadUpload(UNSUPPORTED_URI, "http(s) fetching is off (--allow-http to enable)")
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            try:
                data, location = self._http_once(current, deadline)
            except TimeoutError as e:
                raise FetchRetry(f"{url[:200]}: no complete answer within {self.timeout_s:g} s",
                                 reason=FETCH_TIMEOUT) from e
            except ssl.SSLCertVerificationError as e:
                raise BadUpload(UNSUPPORTED_URI, f"{current[:200]}: TLS certificate: {e.verify_message}") from None
            except (OSError, http.client.HTTPException) as e:
                raise FetchRetry(f"{current[:200]}: {e!r}"[:500]) from e
            if location is None:
                return data
            if hop == MAX_REDIRECTS:
                raise BadUpload(UNSUPPORTED_URI, f"{url[:200]}: more than {MAX_REDIRECTS} redirects")
            current = urljoin(current, location)
        raise AssertionError("unreachable")

    def _http_once(self, url: str, deadline: float) -> tuple[bytes, str | None]:
        """One request: (body, None), or (b"", the Location of a redirect)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise BadUpload(UNSUPPORTED_URI, f"not a valid URL: {url[:200]!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadUpload(UNSUPPORTED_URI, f"not an http(s) URL with a host: {url[:200]!r}")
        if parts.username is not None or parts.password is not None:
            raise BadUpload(UNSUPPORTED_URI, f"credentials in the URL: {url[:200]!r}")
        host, https = parts.hostname, parts.scheme == "https"
        default_port = 443 if https else 80
        port = port or default_port
        sock = self._connect(host, port, deadline)
        try:
            if https:
                sock = self._tls(sock, host, deadline)
            conn = http.client.HTTPConnection(host, port)  # never connects or resolves: the socket is given
            conn.sock, conn.auto_open = _DeadlineSocket(sock, deadline), 0
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            path = quote(path, safe="/?&=%:@!$'()*+,;~")  # non-ASCII and spaces percent-encoded, escapes kept
            try:
                host_header = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise BadUpload(UNSUPPORTED_URI, f"host of {url[:200]!r}") from None
            if ":" in host_header:
                host_header = f"[{host_header}]"
            if port != default_port:
                host_header += f":{port}"
            try:
                conn.request("GET", path, headers={"Host": host_header, "User-Agent": "danmul-fetch",
                                                   "Accept-Encoding": "identity"})
            except http.client.InvalidURL:
                raise BadUpload(UNSUPPORTED_URI, f"not a valid URL: {url[:200]!r}") from None
            resp = conn.getresponse()
            status = resp.status
            if status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise BadUpload(UNSUPPORTED_URI, f"HTTP {status} without a Location for {url[:200]}")
                return b"", location
            if status in (404, 410):
                raise BadUpload(NOT_FOUND, url[:200])
            if status in (408, 429) or status >= 500:
                raise FetchRetry(f"HTTP {status} for {url[:200]}")
            if not 200 <= status < 300:
                raise BadUpload(UNSUPPORTED_URI, f"HTTP {status} for {url[:200]}")
            length = resp.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > self.max_bytes:
                raise BadUpload(TOO_LARGE, f"{url[:200]} is over {self.max_bytes} bytes")
            chunks, size = [], 0
            while True:
                chunk = resp.read(min(1 << 16, self.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:
                    raise BadUpload(TOO_LARGE, f"{url[:200]} is over {self.max_bytes} bytes")
            return b"".join(chunks), None
        finally:
            sock.close()

    def _connect(self, host: str, port: int, deadline: float) -> socket.socket:
        """Resolve ``host`` once, refuse it unless an address is allowed, connect to an allowed address."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except UnicodeError:
            raise BadUpload(UNSUPPORTED_URI, f"host {host[:100]!r}") from None
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise BadUpload(NOT_FOUND, f"no such host {host[:100]!r}") from None
            raise FetchRetry(f"cannot resolve {host[:100]!r}: {e}") from e
        addresses = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
                if ip not in addresses:
                    addresses.append(ip)
        allowed = [ip for ip in addresses if not address_forbidden(ip, self.http_allow_networks)]
        if not allowed:
            shown = ", ".join(str(ip) for ip in addresses[:4]) or "nothing"
            raise BadUpload(FORBIDDEN_ADDRESS, f"{host[:100]!r} resolves to {shown}: not a public address")
        error: OSError | None = None
        for ip in allowed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return socket.create_connection((str(ip), port), timeout=left)
            except OSError as e:
                error = e
        if error is None:
            raise TimeoutError("no time left to connect")
        raise error

    def _tls(self, sock: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
        """TLS with SNI and certificate checks for ``host`` over a connection to its vetted address; the
        handshake counts against the fetch's deadline as a whole."""
        context = self.ssl_context or ssl.create_default_context()
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        try:
            tls.setblocking(False)
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    event = select.POLLIN
                except ssl.SSLWantWriteError:
                    event = select.POLLOUT
                left = deadline - time.monotonic()
                poller = select.poll()  # not select(): a busy process may hold descriptors past FD_SETSIZE
                poller.register(tls, event)
                if left <= 0 or not poller.poll(left * 1000):
                    raise TimeoutError("TLS handshake took too long")
        except BaseException:
            tls.close()
            raise


def _under(path: str, roots: Iterable[str]) -> bool:
    """Whether absolute ``path`` is one of ``roots`` or lies under one (a plain string test)."""
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class _DeadlineSocket:
    """What :mod:`http.client` needs of a socket, with every send and receive bounded by one deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("past the fetch's time limit")
        self.sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self._arm()
        self.sock.sendall(data)

    def recv_into(self, buf) -> int:
        self._arm()
        return self.sock.recv_into(buf)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        pass  # http.client closes a connection whose response it still reads: the fetch closes the socket itself


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket):
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self._sock.recv_into(buf)
