"""The fetcher's rules for untrusted image URIs: local roots, S3 buckets (against a real S3 API, moto's server
mode), and http(s) against real local HTTP servers (SSRF: addresses, redirects, DNS rebinding, a total time
limit, TLS name checks)."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, quote, urlsplit

import boto3
import pytest
from tls_certs import issue, make_ca, write_ca

from ingest.fetch import (
    MAX_BUCKET_CLIENTS,
    FetchRetry,
    ImageFetcher,
    address_forbidden,
    default_allowed_buckets,
    s3_error_reason,
    s3_unreachable,
    store_of,
)
from ingest.queue import BadUpload

IMAGE = b"\x89PNG fake image bytes"
LOCAL = ["127.0.0.0/8"]  # what the tests allow http fetches to reach besides public addresses
DEADLINE_SLACK = 5  # a fetch that must end at its deadline has returned by deadline x this (a loaded machine)


def reason_of(fetcher: ImageFetcher, uri: str) -> str:
    with pytest.raises(BadUpload) as e:
        fetcher.fetch(uri)
    return e.value.reason


# -- local paths ---------------------------------------------------------------------------------------------
def test_fetcher_rules(tmp_path):
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "1.jpg").write_bytes(b"data")
    (root / "big.jpg").write_bytes(b"x" * 101)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.txt", root / "escape.jpg")
    f = ImageFetcher([str(root)], max_bytes=100)
    assert f.fetch(str(root / "1.jpg")) == b"data" and f.fetch(f"file://{root}/1.jpg") == b"data"
    cases = {
        str(root / "1.jpg") + "\0.png": "unsupported_uri",  # a NUL: no file has it (realpath would raise)
        str(tmp_path / "secret.txt"): "forbidden_path",
        str(root / ".." / "secret.txt"): "forbidden_path",
        str(root / "escape.jpg"): "forbidden_path",  # a symlink out of the root
        str(root / "absent.jpg"): "not_found",
        str(root / "big.jpg"): "too_large",
        "http://example.com/a.jpg": "unsupported_uri",  # off by default
        "ftp://example.com/a.jpg": "unsupported_uri",
        "s3://bucket-only": "unsupported_uri",
    }
    for uri, reason in cases.items():
        with pytest.raises(BadUpload) as e:
            f.fetch(uri)
        assert e.value.reason == reason, uri
    with pytest.raises(BadUpload) as e:
        ImageFetcher([]).fetch(str(root / "1.jpg"))  # no roots: no local paths at all
    assert e.value.reason == "forbidden_path"
    with pytest.raises(FetchRetry):  # an allowed address where nothing listens: worth another try later
        ImageFetcher([], allow_http=True, http_allow_networks=LOCAL).fetch(f"http://127.0.0.1:{_closed_port()}/a.jpg")


# -- allowed buckets -----------------------------------------------------------------------------------------
def test_default_allowed_buckets():
    assert default_allowed_buckets("s3://models/danmul/v3", "") == {"models"}
    assert default_allowed_buckets("/srv/models/v3", "") == set()  # no s3:// uploads until buckets are listed
    assert default_allowed_buckets("/srv/models/v3", " uploads , s3://archive/ ,") == {"uploads", "archive"}
    assert default_allowed_buckets("s3://models/v3", "uploads") == {"uploads", "models"}
    assert default_allowed_buckets("s3://models/v3", "uploads,*") is None
    assert default_allowed_buckets("/srv/m", "*") is None
    with pytest.raises(ValueError, match="not prefixes"):
        default_allowed_buckets("/srv/m", "s3://uploads/only-this")
    assert ImageFetcher(allowed_buckets=["a-bucket", "*"]).allowed_buckets is None


def test_no_allowed_bucket_refuses_every_s3_uri_before_any_request():
    f = ImageFetcher(allowed_buckets=set(), endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    assert reason_of(f, "s3://models/model.safetensors") == "forbidden_bucket"
    assert not f._buckets  # refused without making a client, let alone a request


def test_s3_buckets_and_errors_against_a_real_s3_api(s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    tag = uuid.uuid4().hex[:8]
    pics, secret, locked, gone = f"pics-{tag}", f"secret-{tag}", f"locked-{tag}", f"gone-{tag}"
    for bucket in (pics, secret, locked):
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="a.jpg", Body=IMAGE)
    s3.put_object(Bucket=pics, Key="dir/b.jpg", Body=IMAGE)
    s3.put_object(Bucket=pics, Key="big.jpg", Body=b"x" * 101)
    s3.put_bucket_policy(Bucket=locked, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{locked}", f"arn:aws:s3:::{locked}/*"]}]}))  # fmt: skip
    f = ImageFetcher(allowed_buckets={pics, locked, gone}, max_bytes=100)
    assert f.fetch(f"s3://{pics}/a.jpg") == IMAGE and f.fetch(f"s3://{pics}/dir/b.jpg") == IMAGE
    cases = {
        f"s3://{secret}/a.jpg": "forbidden_bucket",  # the credentials reach it; uploads may not
        f"s3://{locked}/a.jpg": "forbidden_bucket",  # AccessDenied from S3 itself: permanent, not a retry
        f"s3://{gone}/a.jpg": "not_found",  # NoSuchBucket
        f"s3://{pics}/absent.jpg": "not_found",
        f"s3://{pics}/big.jpg": "too_large",
        f"s3://{pics}/../{secret}/a.jpg": "unsupported_uri",  # a path-style endpoint would resolve it to secret
        f"s3://{pics}/dir/../a.jpg": "unsupported_uri",
        f"s3://{pics}//a.jpg": "unsupported_uri",
        f"s3://{pics}/dir/": "unsupported_uri",
    }
    for uri, reason in cases.items():
        assert reason_of(f, uri) == reason, uri
    anywhere = ImageFetcher(max_bytes=100)  # allowed_buckets=None: any bucket, as the backfill uses it
    assert anywhere.fetch(f"s3://{secret}/a.jpg") == IMAGE
    for uri, reason in {"s3://not-a-bucket!/a.jpg": "unsupported_uri", "s3://ab/a.jpg": "unsupported_uri",
                        "s3://10.0.0.1/a.jpg": "unsupported_uri", f"s3://{pics}/dir": "not_found",
                        f"s3://{locked}/a.jpg": "forbidden_bucket"}.items():
        assert reason_of(anywhere, uri) == reason, uri


def test_s3_client_cache_is_bounded(s3_endpoint):
    f = ImageFetcher()
    names = [f"absent-{i:02d}-{uuid.uuid4().hex[:8]}" for i in range(MAX_BUCKET_CLIENTS + 8)]
    for name in names:
        assert reason_of(f, f"s3://{name}/a.jpg") == "not_found"
        reason_of(f, f"s3://{names[0]}/a.jpg")  # the first bucket stays in use
    assert len(f._buckets) == MAX_BUCKET_CLIENTS
    assert names[0] in f._buckets and names[1] not in f._buckets and names[-1] in f._buckets


def test_s3_unreachable_endpoint_is_a_retry(s3_endpoint):  # s3_endpoint: for its credentials in the environment
    f = ImageFetcher(endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(FetchRetry, match="NETWORK_CONNECTION"):
        f.fetch("s3://pics/a.jpg")


@pytest.mark.parametrize("status,code,outcome", [
    (503, "SlowDown", None), (500, "InternalError", None), (429, "SlowDown", None), (403, "AccessDenied",
                                                                                      "forbidden_bucket"),
    (400, "InvalidRequest", "unsupported_uri"), (301, "PermanentRedirect", "unsupported_uri"),
])  # fmt: skip
def test_s3_error_answers_of_a_real_endpoint(s3_endpoint, status, code, outcome):
    """An S3 endpoint that answers every request with one error (what S3 says when throttling, failing,
    denying...): pyarrow's real client reports it, the fetcher classifies it."""
    server = _serve(_s3_error_handler(status, code))
    try:
        f = ImageFetcher(endpoint_url=f"http://127.0.0.1:{server.server_address[1]}")
        if outcome is None:
            with pytest.raises(FetchRetry):
                f.fetch("s3://pics/a.jpg")
        else:
            assert reason_of(f, "s3://pics/a.jpg") == outcome
    finally:
        server.shutdown()
        server.server_close()


def test_s3_error_messages_pyarrow_raises():
    """Messages as pyarrow 26 words them (seen against moto and an S3 endpoint answering errors)."""
    head = "When reading information for key 'a.jpg' in bucket 'b': AWS Error {} during HeadObject operation: x"
    cases = {
        head.format("ACCESS_DENIED"): "forbidden_bucket",
        head.format("UNKNOWN (HTTP status 403)"): "forbidden_bucket",
        head.format("NO_SUCH_BUCKET"): "not_found",
        head.format("UNKNOWN (HTTP status 301)"): "unsupported_uri",
        head.format("UNKNOWN (HTTP status 503)"): None,
        head.format("UNKNOWN (HTTP status 429)"): None,
        head.format("UNKNOWN (HTTP status 408)"): None,
        head.format("NETWORK_CONNECTION"): None,
        head.format("SLOW_DOWN"): None,
        head.format("SIGNATURE_DOES_NOT_MATCH"): None,
        head.format("[code 133]"): None,
        "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream": None,
        "Not a regular file: 'b/dir/'": "not_found",
        "connection reset by peer": None,
    }
    for message, reason in cases.items():
        assert s3_error_reason(OSError(message)) == reason, message
    wrapped = OSError("cannot read s3://b/a.jpg")
    wrapped.__cause__ = FileNotFoundError("[Errno 2] Path does not exist 'b/a.jpg'")
    assert s3_error_reason(wrapped) == "not_found"
    # a key may spell anything: the error is the message's last "AWS Error", not one inside the key
    sly = "When reading information for key 'AWS Error NO_SUCH_KEY' in bucket 'b': AWS Error {} during HeadObject"
    assert s3_error_reason(OSError(sly.format("UNKNOWN (HTTP status 503)") + " operation: x")) is None


def test_only_a_connection_that_could_not_be_made_says_the_store_is_unreachable():
    """The backfill leaves the rest of a batch's S3 images for the next run when the endpoint did not answer at
    all (curl 6: name not resolved; 7: refused); a timeout, a cut connection or a TLS failure may be one
    object's trouble, and each such image is still tried."""
    head = "When reading information for key '{}' in bucket 'b': AWS Error {} during HeadObject operation: curlCode: {}"
    cases = {
        ("a.jpg", "NETWORK_CONNECTION", "7, Could not connect to server"): True,
        ("a.jpg", "NETWORK_CONNECTION", "6, Could not resolve hostname"): True,
        ("a.jpg", "NETWORK_CONNECTION", "28, Timeout was reached"): False,
        ("a.jpg", "NETWORK_CONNECTION", "56, Failure when receiving data from the peer"): False,
        ("a.jpg", "NETWORK_CONNECTION", "35, SSL connect error"): False,
        ("a.jpg", "UNKNOWN (HTTP status 503)", "7"): False,
        ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7", "ACCESS_DENIED", "x"): False,
    }
    for (key, kind, curl), unreachable in cases.items():
        message = head.format(key, kind, curl)
        assert s3_unreachable(OSError(message)) is unreachable, message
        wrapped = OSError(f"cannot read s3://b/{key}")
        wrapped.__cause__ = OSError(message)
        assert s3_unreachable(wrapped) is unreachable, message
    assert (store_of("s3://bucket-a/x/y.jpg"), store_of("/local/y.jpg"), store_of("https://h/y.jpg")) == (
        "s3://bucket-a", None, None)


# -- http(s): addresses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1",
    "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "::1", "::", "fe80::1", "fc00::1", "fec0::1",
    "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:7f00:1::1", "2001:db8::1",
])  # fmt: skip
def test_non_public_addresses_are_forbidden(address):
    assert address_forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address):
    assert not address_forbidden(ipaddress.ip_address(address))


def test_allow_networks_open_only_what_they_name():
    local = [ipaddress.ip_network(n) for n in LOCAL]
    assert not address_forbidden(ipaddress.ip_address("127.0.0.1"), local)
    assert not address_forbidden(ipaddress.ip_address("::ffff:127.0.0.1"), local)  # the same address
    for other in ("::1", "10.0.0.1", "169.254.169.254"):
        assert address_forbidden(ipaddress.ip_address(other), local), other


@pytest.fixture(scope="module")
def web():
    """A real HTTP server on 127.0.0.1 (see _Handler for its paths); yields its base URL."""
    server = _serve(_Handler)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def http_fetcher(**kw) -> ImageFetcher:
    kw.setdefault("http_allow_networks", LOCAL)
    return ImageFetcher(allow_http=True, max_bytes=1000, **kw)


def test_http_fetch_from_an_allowed_network(web):
    f = http_fetcher()
    assert f.fetch(f"{web}/img") == IMAGE
    assert f.fetch(f"{web}/echo/ä b%41?q=é") == b"/echo/%C3%A4%20b%41?q=%C3%A9"  # encoded as a browser would
    port = urlsplit(web).port
    assert f.fetch(f"http://localhost:{port}/host") == f"localhost:{port}".encode()  # the URL's host, sent as is
    assert reason_of(f, f"{web}/big") == "too_large"  # Content-Length over the cap
    assert reason_of(f, f"{web}/big-unsized") == "too_large"  # no length: the read stops at the cap
    assert reason_of(f, f"{web}/status/404") == "not_found"
    assert reason_of(f, f"{web}/status/403") == "unsupported_uri"
    with pytest.raises(FetchRetry, match="HTTP 503"):
        f.fetch(f"{web}/status/503")


def test_http_refuses_private_targets(web):
    port = urlsplit(web).port
    assert reason_of(http_fetcher(http_allow_networks=()), f"{web}/img") == "forbidden_address"
    f = http_fetcher(http_allow_networks=())
    for host in ("localhost", "0.0.0.0", "169.254.169.254", "10.0.0.1", "192.168.0.10", "[::1]", "[::]",
                 "[::ffff:127.0.0.1]", "[fe80::1]", "[fd00::1]", "2130706433", "0x7f000001", "224.0.0.1",
                 "100.64.0.1", "[2002:a9fe:a9fe::1]"):
        assert reason_of(f, f"http://{host}:{port}/img") == "forbidden_address", host
    assert reason_of(f, "https://169.254.169.254/latest/meta-data/") == "forbidden_address"


def test_http_redirects_are_checked_and_bounded(web):
    f = http_fetcher()
    port = urlsplit(web).port
    assert f.fetch(f"{web}/hops/3") == IMAGE  # three redirects are fine (relative Locations too)
    assert reason_of(f, f"{web}/hops/4") == "unsupported_uri"  # a fourth is not
    for target in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", f"http://[::1]:{port}/img",
                   f"http://0.0.0.0:{port}/img"):
        assert reason_of(f, f"{web}/redirect?to={quote(target, safe='')}") == "forbidden_address", target
    assert f.fetch(f"{web}/redirect?to={quote(f'http://localhost:{port}/img', safe='')}") == IMAGE
    assert reason_of(f, f"{web}/redirect?to={quote('ftp://example.com/a.jpg', safe='')}") == "unsupported_uri"


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_http_time_limit_covers_the_whole_fetch(web, path):
    """The server sends a byte every 0.1 s (each read is quick, the whole is not): a per-read timeout would
    wait for all of it and succeed; the fetch's one limit stops it."""
    t0 = time.monotonic()
    with pytest.raises(FetchRetry, match=r"no complete answer within 0\.5 s") as e:
        http_fetcher(timeout_s=0.5).fetch(f"{web}{path}")
    assert e.value.reason == "fetch_timeout" and time.monotonic() - t0 < 0.5 * DEADLINE_SLACK
    assert http_fetcher(timeout_s=0.5).fetch(f"{web}/img") == IMAGE


def test_https_handshake_counts_against_the_time_limit():
    """A server that accepts the connection and never answers the TLS hello."""
    with _silent_server() as port, pytest.raises(FetchRetry, match=r"no complete answer within 0\.5 s") as e:
        http_fetcher(timeout_s=0.5).fetch(f"https://127.0.0.1:{port}/img")
    assert e.value.reason == "fetch_timeout"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_silent_http_server_is_a_timeout(scheme):
    with _silent_server() as port:
        t0 = time.monotonic()
        with pytest.raises(FetchRetry) as e:
            http_fetcher(timeout_s=0.5).fetch(f"{scheme}://127.0.0.1:{port}/img")
    assert e.value.reason == "fetch_timeout" and time.monotonic() - t0 < 0.5 * DEADLINE_SLACK


# -- one deadline for S3 too -------------------------------------------------------------------------------------
@pytest.fixture
def s3_credentials(monkeypatch):
    """Dummy credentials (without any, the S3 client would first ask the instance metadata service)."""
    for name, value in {"AWS_ACCESS_KEY_ID": "danmul-test", "AWS_SECRET_ACCESS_KEY": "danmul-test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)


def test_an_s3_endpoint_that_never_answers_is_a_timeout_within_the_deadline(s3_credentials):
    """It accepts the connection (the kernel does) and never sends a byte: the S3 client's stall timeout and
    attempts, set from the deadline, end the fetch, as a retry named fetch_timeout. (4 s: the client counts
    stalls in whole seconds, so a shorter deadline would take it longer than the deadline.)"""
    with _silent_server() as port:
        f = ImageFetcher(allowed_buckets={"pics"}, endpoint_url=f"http://127.0.0.1:{port}", timeout_s=4.0)
        t0 = time.monotonic()
        with pytest.raises(FetchRetry) as e:
            f.fetch("s3://pics/a.jpg")
    assert e.value.reason == "fetch_timeout" and e.value.unreachable is None, e.value
    assert time.monotonic() - t0 < 4.0 * DEADLINE_SLACK


def test_s3_reads_check_the_deadline_between_chunks(s3_endpoint, monkeypatch):
    from ingest import fetch

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"chunks-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="a.jpg", Body=IMAGE)
    monkeypatch.setattr(fetch, "S3_READ_CHUNK", 4)  # IMAGE in 6 ranged GETs
    f = ImageFetcher(allowed_buckets={bucket})
    assert f.fetch(f"s3://{bucket}/a.jpg") == IMAGE
    clock = iter([0.0, 0.0, 0.0, 100.0])  # the third chunk is asked for after the deadline
    monkeypatch.setattr(fetch.time, "monotonic", lambda: next(clock, 100.0))
    with pytest.raises(FetchRetry) as e:
        f.fetch(f"s3://{bucket}/a.jpg")
    assert e.value.reason == "fetch_timeout"


def test_http_connects_to_the_address_it_checked(web, monkeypatch):
    """DNS rebinding: the name answers an allowed address once, then a forbidden one. The fetch must use
    the first answer (and send the name as Host), never resolve again."""
    port = urlsplit(web).port
    real = socket.getaddrinfo
    calls = []

    def rebinding(host, *args, **kwargs):
        if host != "images.danmul.test":
            return real(host, *args, **kwargs)
        calls.append(host)
        ip = "127.0.0.1" if len(calls) == 1 else "127.0.0.2"  # 127.0.0.2: nothing listens there
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    f = http_fetcher(http_allow_networks=["127.0.0.0/8"])
    assert f.fetch(f"http://images.danmul.test:{port}/host") == f"images.danmul.test:{port}".encode()
    assert calls == ["images.danmul.test"]


def test_https_verifies_the_url_host_on_the_checked_address(tmp_path):
    ca, ca_key = make_ca()
    good, wrong = _tls_server(tmp_path, ca, ca_key, "localhost"), _tls_server(tmp_path, ca, ca_key, "elsewhere.test")
    trust = ssl.create_default_context(cafile=str(write_ca(ca, tmp_path)))
    try:
        f = http_fetcher(ssl_context=trust)
        assert f.fetch(f"https://localhost:{good.server_address[1]}/img") == IMAGE
        assert good.sni == ["localhost"]  # SNI names the host although the connection went to 127.0.0.1
        assert reason_of(f, f"https://localhost:{wrong.server_address[1]}/img") == "unsupported_uri"
        assert reason_of(http_fetcher(), f"https://localhost:{good.server_address[1]}/img") == "unsupported_uri"
    finally:
        for s in (good, wrong):
            s.shutdown()
            s.server_close()


# -- helpers -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port whose connections the kernel accepts and nobody ever reads or answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        yield silent.getsockname()[1]


def _closed_port() -> int:
    """A local port where nothing listens (bound a moment, then freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    sni: list


def _serve(handler, context: ssl.SSLContext | None = None) -> _Server:
    server = _Server(("127.0.0.1", 0), handler)
    server.sni = []
    if context is not None:
        context.sni_callback = lambda sock, name, ctx: server.sni.append(name)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Handler(http.server.BaseHTTPRequestHandler):
    """/img, /host (echoes Host), /echo/... (echoes the request's path), /big, /big-unsized, /status/N,
    /redirect?to=URL, /hops/N (N redirects, then /img), /trickle-body and /trickle-headers (a byte every 0.1 s)."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        try:
            if path == "/img":
                self._send(200, IMAGE)
            elif path == "/host":
                self._send(200, self.headers["Host"].encode())
            elif path.startswith("/echo/"):
                self._send(200, self.path.encode())
            elif path == "/big":
                self._send(200, b"x" * 5000)
            elif path == "/big-unsized":
                self.close_connection = True
                self._send(200, b"x" * 5000, length=False)
            elif path.startswith("/status/"):
                self._send(int(path.rsplit("/", 1)[1]), b"no")
            elif path == "/redirect":
                self._send(302, headers={"Location": parse_qs(url.query)["to"][0]})
            elif path.startswith("/hops/"):
                n = int(path.rsplit("/", 1)[1])
                self._send(302, headers={"Location": f"/hops/{n - 1}" if n > 1 else "/img"})
            elif path == "/trickle-body":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self._trickle(b"x" * 100)
            elif path == "/trickle-headers":
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                self._trickle(b"X-Slow: " + b"a" * 100 + b"\r\n\r\n")
            else:
                self._send(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: expected for the trickles

    def _trickle(self, data: bytes) -> None:
        for i in range(len(data)):
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(0.1)


def _s3_error_handler(status: int, code: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _error(self, body: bool) -> None:
            xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>m</Message></Error>"
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)) if body else "0")
            self.end_headers()
            if body:
                self.wfile.write(xml.encode())

        def do_HEAD(self) -> None:
            self._error(False)

        def do_GET(self) -> None:
            self._error(True)

    return Handler


def _tls_server(tmp_path, ca, ca_key, dns_name: str) -> _Server:
    """A real HTTPS server on 127.0.0.1 whose certificate (signed by ``ca``) names ``dns_name``."""
    cert_file, key_file = issue(ca, ca_key, tmp_path, dns_name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return _serve(_Handler, context)
