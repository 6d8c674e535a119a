"""Fetching an upload's image by URI, with the rules untrusted input needs.

- ``s3://bucket/key``: object storage (endpoint and credentials as in :mod:`ingest.storage`), only in the
  allowed buckets (``allowed_buckets``; see :func:`default_allowed_buckets`): any other bucket is
  ``forbidden_bucket``, so an upload cannot probe every bucket the credentials reach. A key with an empty,
  ``.`` or ``..`` path segment is refused (``s3://allowed/../other/key`` would otherwise reach ``other``
  through a path-style endpoint).
- a local path (or ``file://``): only under one of the configured roots, after resolving symlinks
  and ``..``; anything else is ``forbidden_path``. No roots configured: no local paths at all.
- ``http(s)://``: off unless enabled (a tagger that fetches any URL it is given is an SSRF hole). When on,
  the host is resolved once and only a public address is connected to (private, loopback, link-local,
  multicast, reserved and unspecified ones, IPv4 and IPv6, IPv4-mapped or embedded, are
  ``forbidden_address``); the request goes to the address that was checked, with the URL's host in the
  ``Host`` header and, for https, in SNI and certificate verification, so a DNS answer that changes
  between the check and the connection cannot redirect it. At most :data:`MAX_REDIRECTS` redirects, each
  target checked the same way. One time limit covers the whole fetch (connect, TLS, headers, body, every
  redirect), not each read: a server that trickles bytes cannot hold a fetch longer than that. Environment
  proxies are not used (a proxy would resolve the name itself, past the check). Name resolution itself is
  bounded by the system resolver's own timeouts.

Permanent failures raise :class:`ingest.queue.BadUpload` with a reason code; failures that may pass
raise :class:`FetchRetry`. Every read is capped at ``max_bytes``.

Reason codes added here (beside those of :mod:`ingest.queue`, whose block they belong to):
``forbidden_bucket`` (an S3 bucket outside the allowed ones, or one that refuses access: AccessDenied)
and ``forbidden_address`` (an http(s) target that is not a public address).

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

import http.client
import io
import ipaddress
import os
import re
import select
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from urllib.parse import quote, urljoin, urlsplit

from ingest.queue import FORBIDDEN_PATH, NOT_FOUND, UNSUPPORTED_URI, BadUpload
from ingest.storage import NotFound, Storage, TooLarge, is_s3

# Reason codes of this module (dead letters and backfill error rows), beside ingest.queue's.
FORBIDDEN_BUCKET = "forbidden_bucket"
FORBIDDEN_ADDRESS = "forbidden_address"
TOO_LARGE = "too_large"  # the same code as model.preprocess.ImageError's

HTTP_TIMEOUT_S = 10.0  # the whole http(s) fetch, redirects included
MAX_REDIRECTS = 3
MAX_BUCKET_CLIENTS = 16  # S3 clients kept, one per bucket, least recently used dropped first
ANY_BUCKET = "*"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
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
    ``unreachable`` names the store when nothing answered at all (S3's endpoint refused the connection or
    its name did not resolve, after the client's own retries): its other objects will not answer now
    either, so a caller with many to fetch may leave them for later without waiting on each."""

    def __init__(self, message: str, unreachable: str | None = None):
        super().__init__(message)
        self.unreachable = unreachable


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
    image server on a private network the operator vouches for); ``http_timeout_s``: the total time of one
    http(s) fetch; ``ssl_context``: how https certificates are verified (default: the system's CAs)."""

    def __init__(self, local_roots: Sequence[str] = (), allow_http: bool = False, endpoint_url: str | None = None,
                 max_bytes: int = 32 << 20, *, allowed_buckets: Collection[str] | None = None,
                 http_allow_networks: Sequence[str] = (), http_timeout_s: float = HTTP_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None):
        self.roots = [os.path.realpath(r) for r in local_roots]
        self.allow_http, self.endpoint_url, self.max_bytes = allow_http, endpoint_url, max_bytes
        self.allowed_buckets = None if allowed_buckets is None or ANY_BUCKET in allowed_buckets else frozenset(
            allowed_buckets)
        self.http_allow_networks = [ipaddress.ip_network(n, strict=False) for n in http_allow_networks]
        self.http_timeout_s = http_timeout_s
        # made once (loading the system's CAs per fetch would cost more than many fetches)
        self.ssl_context = ssl_context or (ssl.create_default_context() if allow_http else None)
        self._buckets: OrderedDict[str, Storage] = OrderedDict()  # one S3 client per bucket, bounded LRU
        self._lock = threading.Lock()

    def fetch(self, uri: str) -> bytes:
        if is_s3(uri):
            return self._s3(uri)
        if uri.startswith(("http://", "https://")):
            return self._http(uri)
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if "://" in uri:
            raise BadUpload(UNSUPPORTED_URI, f"scheme of {uri[:200]!r}")
        return self._local(uri)

    # -- s3 -----------------------------------------------------------------------------------------------
    def _s3(self, uri: str) -> bytes:
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket or not key:
            raise BadUpload(UNSUPPORTED_URI, f"{uri[:200]!r} names no object")
        if self.allowed_buckets is not None:
            if bucket not in self.allowed_buckets:
                raise BadUpload(FORBIDDEN_BUCKET, f"bucket {bucket[:70]!r} is not one uploads may name")
        elif not valid_bucket_name(bucket):
            raise BadUpload(UNSUPPORTED_URI, f"{bucket[:70]!r} is not a valid S3 bucket name")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise BadUpload(UNSUPPORTED_URI, f"{uri[:200]!r}: empty, '.' or '..' path segment in the key")
        return self._read(self._bucket(bucket), key, uri)

    def _bucket(self, bucket: str) -> Storage:
        with self._lock:
            storage = self._buckets.get(bucket)
            if storage is None:
                storage = self._buckets[bucket] = Storage(f"s3://{bucket}", self.endpoint_url)
                while len(self._buckets) > MAX_BUCKET_CLIENTS:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(bucket)
            return storage

    def _read(self, storage: Storage, rel: str, uri: str) -> bytes:
        try:
            return storage.read_bytes(rel, max_bytes=self.max_bytes)
        except NotFound:
            raise BadUpload(NOT_FOUND, uri[:200]) from None
        except TooLarge:
            raise BadUpload(TOO_LARGE, f"{uri[:200]} is over {self.max_bytes} bytes") from None
        except OSError as e:
            reason = s3_error_reason(e)
            if reason is not None:
                raise BadUpload(reason, f"{uri[:200]}: {str(e)[:300]}") from None
            raise FetchRetry(f"{uri[:200]}: {e}", store_of(uri) if s3_unreachable(e) else None) from e
        except ValueError as e:  # pyarrow.ArrowInvalid: a path pyarrow cannot address
            raise BadUpload(UNSUPPORTED_URI, f"{uri[:200]}: {str(e)[:300]}") from None

    # -- local --------------------------------------------------------------------------------------------
    def _local(self, path: str) -> bytes:
        if not self.roots:
            raise BadUpload(FORBIDDEN_PATH, "local paths are not enabled (no --local-roots)")
        if "\0" in path:  # os.path.realpath and open() raise on it: a path no file has
            raise BadUpload(UNSUPPORTED_URI, "a NUL byte in the path")
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
            raise BadUpload(TOO_LARGE, f"{path[:200]} is over {self.max_bytes} bytes")
        return data

    # -- http(s) ------------------------------------------------------------------------------------------
    def _http(self, url: str) -> bytes:
        if not self.allow_http:
            raise BadUpload(UNSUPPORTED_URI, "http(s) fetching is off (--allow-http to enable)")
        deadline = time.monotonic() + self.http_timeout_s
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            try:
                data, location = self._http_once(current, deadline)
            except TimeoutError as e:
                raise FetchRetry(f"{url[:200]}: no complete answer within {self.http_timeout_s:g} s") from e
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
