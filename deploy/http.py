"""The HTTP API of the streaming tagger (a Serve ingress deployment over FastAPI).

- ``POST /evaluate``: Danbooru's autotagger protocol, so a Danbooru instance can point its autotagger
  URL here. ``multipart/form-data`` with one or several ``file`` parts, and the fields ``threshold``
  (default 0.1), ``limit`` (default 50) and ``format`` (``json``; ``html`` is answered with the same
  JSON). Answer: ``[{"filename": name, "tags": {tag: score, ...}}]``: character tags first (best
  first), then general tags by score, ``limit`` in all. A file that is not a usable image (an empty
  one included) gets ``"tags": {}`` and an ``"error"`` reason code; the others still answer.
- ``POST /v1/tag``: one image (one multipart ``file`` part, or the raw body with any other content
  type, e.g. ``image/jpeg``; a urlencoded form is refused) with optional ``tags``
  (space-separated), ``threshold``, ``top_k``; answers the full result (characters, tags, model,
  abstained, best_character), or 422 with the reason code when the image cannot be used.
- ``GET /health``: the model version and a consumer's status; 503 while the model cannot answer.
  Never needs a key, never waits for a slot.

Parameters come from the query string or from the multipart form's non-file parts (either, not
both: a parameter given twice is refused). Empty values mean the default; unknown names are
ignored. Every value must be UTF-8. Bounds:

==============  ===========================================================================
``threshold``   a decimal number (``0.5``, ``1e-2``), finite, 0 <= threshold <= 1
``limit``       an integer, 1 <= limit <= 1000 (``/evaluate``)
``top_k``       an integer, 1 <= top_k <= 100 (``/v1/tag``; default: the model's ``top_k``)
``format``      ``json`` or ``html`` (``/evaluate``)
``tags``        at most 1000 tags of at most 200 characters, printable (``model.vocab``)
``file``        a part with a filename (at most 1024 characters); ``/evaluate`` at most 16, ``/v1/tag`` one
==============  ===========================================================================

Per request: at most ``max_request_bytes`` of body (413; refused before reading when
``Content-Length`` says so), at most 64 million decoded pixels over all its images, as their headers
declare them (413), at most 16 other form parts and 16 query parameters (400). The body must arrive
within ``http_read_timeout_s`` in all (a total deadline, not per chunk): otherwise 408 and the
connection is closed.

Each image is checked before it goes to the model, exactly as a model replica would refuse it from its
bytes and header (``model.preprocess.declared_size``: the same accepted formats, so an EPS is never
parsed; the same structure and pixel budgets), in decode worker processes with the same CPU and memory
budget per image (``model.decode_pool``), never on the threads that answer requests. A refused image
gets its reason code without a model call: ``/v1/tag`` answers 422, ``/evaluate`` lists it with its
``error``.

Every error is JSON: ``{"error": message, "field": name}`` (``field`` is null when no one field is
at fault). Codes: 400 a bad parameter or form, 401 no or a wrong API key, 408 the body came too
slowly, 413 too large (body, files, pixels), 422 ``/v1/tag``'s image cannot be used, 503 busy (no
slot within half a second; ``Retry-After``) or the model cannot answer (a replica died; also
``Retry-After``).

API keys (``api_keys_file``: one key per line, blank lines and ``#`` comments ignored, surrounding
whitespace stripped; only their SHA-256 digests are kept, and a presented key is compared with every
one of them in constant time). Every endpoint but ``GET /health`` then needs one of:

- ``Authorization: Bearer KEY``;
- ``Authorization: Basic base64(login:KEY)``: Danbooru's form, any login, the key as the password;
- the query parameter ``api_key=KEY`` (Danbooru's ``?login=...&api_key=...``; ``login`` is ignored;
  Serve's logs name the route only, but proxies in front may log URLs: prefer the header forms).

The ``Authorization`` header wins when both are given; a key in a form field is not read. No key or
a wrong one: 401 with ``WWW-Authenticate``. Keys are never logged.

No interactive documentation (``/docs``, ``/redoc``, ``/openapi.json``) is served: the API is for
machines (a Danbooru instance, the platform), described in ``docs/streaming.md``, and a schema page is
one more unauthenticated answer to keep in step with the keys.

Concurrency: one replica works on at most ``http_max_concurrency`` requests of ``/evaluate`` and
``/v1/tag`` at once, body reading included; a request that finds no free slot within
``ADMISSION_WAIT_S`` gets 503. ``danmul_http_requests_total`` counts every answer by code; ``499``
counts requests whose client went away before the answer.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import math
import re
import time
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect

from model.preprocess import ImageError

log = logging.getLogger("danmul.http")

MAX_FILES = 16  # file parts of one /evaluate request
MAX_FORM_FIELDS = 16  # other form parts
MAX_QUERY_FIELDS = 16  # query parameters
MAX_REQUEST_PIXELS = 64_000_000  # decoded width x height, summed over a request's images
CHECK_WORKERS = 2  # decode processes per API replica for the checks (a few ms each; two, so one slow check
# does not hold the others)
MAX_SCALAR_BYTES = 64  # threshold, limit, top_k, format
MAX_TAGS_BYTES = 256 << 10  # tags (model.vocab bounds them further)
MAX_FILENAME_CHARS = 1024
MAX_KEYS_FILE_BYTES = 1 << 20
LIMIT_MAX = 1000
TOP_K_MAX = 100
FORMATS = ("json", "html")
EVALUATE_THRESHOLD = 0.1  # Danbooru autotagger's defaults
EVALUATE_LIMIT = 50
HEALTH_TIMEOUT_S = 5.0  # /health answers within about this, whatever the replicas do
ADMISSION_WAIT_S = 0.5  # how long a request waits for a slot before 503
RETRY_AFTER_S = 1
EVALUATE_PARAMS = frozenset({"threshold", "limit", "format"})
TAG_PARAMS = frozenset({"threshold", "top_k", "tags"})
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_CLOSE = {"Connection": "close"}  # answered before the body was read: do not keep the connection

api = FastAPI(title="danmul", description="Anime character identification and Danbooru tag prediction",
              docs_url=None, redoc_url=None, openapi_url=None)  # machine-facing: see the module's doc


class ApiError(Exception):
    """An answer other than 200: status, message, the field at fault (or None), extra headers."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "field": self.field}, self.status, headers=self.headers)


# -- API keys --------------------------------------------------------------------------------------------
def load_api_keys(path: str) -> list[bytes]:
    """SHA-256 digests of the keys in ``path`` (one per line; blank lines and ``#`` comments ignored).
    Raises ValueError naming the file when it cannot be read or holds no key."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read the API keys file {path}: {e.strerror or e}") from None
    if len(raw) > MAX_KEYS_FILE_BYTES:
        raise ValueError(f"the API keys file {path} is over {MAX_KEYS_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the API keys file {path} is not UTF-8 text") from None
    digests = []
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            digests.append(hashlib.sha256(key.encode("utf-8")).digest())
    if not digests:
        raise ValueError(f"the API keys file {path} holds no key (one per line; # starts a comment)")
    return digests


def key_matches(key: bytes, digests: list[bytes]) -> bool:
    """Whether ``key`` is one of the keys: its digest is compared with every stored one, in constant
    time and without stopping at a match."""
    presented = hashlib.sha256(key).digest()
    found = False
    for stored in digests:
        found |= hmac.compare_digest(presented, stored)
    return found


def presented_key(authorization: list[str], query: list[tuple[str, bytes]]) -> bytes | None:
    """The key a request presents (see the module's doc), or None when it presents none usably."""
    if authorization:
        if len(authorization) > 1:
            return None
        # header values arrive decoded as latin-1: back to the bytes the client sent
        scheme, _, credentials = authorization[0].encode("latin-1").strip().partition(b" ")
        credentials = credentials.strip()
        if scheme.lower() == b"bearer":
            return credentials or None
        if scheme.lower() == b"basic":
            try:
                pair = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                return None
            _, colon, key = pair.partition(b":")
            return key if colon and key else None
        return None
    keys = [v for name, v in query if name == "api_key"]
    return keys[0] if len(keys) == 1 and keys[0] else None


# -- parameters ------------------------------------------------------------------------------------------
def parse_query(raw: bytes) -> list[tuple[str, bytes]]:
    """``a=1&b=2`` -> ``[("a", b"1"), ("b", b"2")]``: names decoded (a name that is not UTF-8 can name no
    parameter, so it is kept replaced), values left as bytes for the parameter's own check."""
    pairs = []
    for piece in raw.split(b"&"):
        if not piece:
            continue
        name, _, value = piece.partition(b"=")
        pairs.append((unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace"),
                      unquote_to_bytes(value.replace(b"+", b" "))))  # fmt: skip
        if len(pairs) > MAX_QUERY_FIELDS:
            raise ApiError(400, f"more than {MAX_QUERY_FIELDS} query parameters", "query")
    return pairs


def collect(pairs: list[tuple[str, bytes]], names: frozenset) -> dict[str, str]:
    """The known parameters among ``pairs``, each at most once, bounded and UTF-8."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in names:
            continue
        if name in out:
            raise ApiError(400, f"{name} is given more than once", name)
        bound = MAX_TAGS_BYTES if name == "tags" else MAX_SCALAR_BYTES
        if len(value) > bound:
            raise ApiError(400, f"{name} is longer than {bound} bytes", name)
        try:
            out[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"{name} is not UTF-8 text", name) from None
    return out


def _value(params: dict[str, str], name: str) -> str | None:
    text = params.get(name)
    if text is None:
        return None
    text = text.strip(" \t\r\n")
    return text or None


def parse_threshold(params: dict[str, str], default: float | None) -> float | None:
    text = _value(params, "threshold")
    if text is None:
        return default
    if len(text) > MAX_SCALAR_BYTES or not _DECIMAL.fullmatch(text):
        raise ApiError(400, "threshold must be a decimal number between 0 and 1", "threshold")
    value = float(text)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ApiError(400, "threshold must be between 0 and 1", "threshold")
    return value


def parse_int(params: dict[str, str], name: str, low: int, high: int, default: int | None) -> int | None:
    text = _value(params, name)
    if text is None:
        return default
    if len(text) > MAX_SCALAR_BYTES or not _INTEGER.fullmatch(text):
        raise ApiError(400, f"{name} must be an integer between {low} and {high}", name)
    value = int(text)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}", name)
    return value


def parse_format(params: dict[str, str]) -> str:
    text = _value(params, "format")
    if text is None:
        return "json"
    if text.lower() not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}", "format")
    return text.lower()


def parse_tags(params: dict[str, str]) -> list[str] | None:
    from ingest.tags import parse_tag_string

    text = params.get("tags")
    if not text:
        return None
    try:
        return parse_tag_string(text) or None
    except ValueError as e:
        raise ApiError(400, f"bad tags: {e}", "tags") from None


# -- multipart bodies ------------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    filename: bytes | None  # as sent; decoded by whoever needs it
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """A ``multipart/form-data`` body (already read, so already bounded) -> its parts, in memory.
    At most ``MAX_FILES`` parts named ``file`` (413 beyond) and ``MAX_FORM_FIELDS`` others (400)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    try:
        _, options = parse_options_header(content_type)
    except ValueError:  # not latin-1: cannot come from an HTTP header
        raise ApiError(400, "unreadable Content-Type", "content-type") from None
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise ApiError(400, "a multipart body needs a boundary of 1 to 200 characters", "content-type")
    parts: list[Part] = []
    state = {"header": b"", "value": b"", "disposition": None, "chunks": [], "ended": False, "files": 0}

    def on_part_begin() -> None:
        state.update(header=b"", value=b"", disposition=None, chunks=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["header"].strip().lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state["header"] = state["value"] = b""

    def on_headers_finished() -> None:
        if state["disposition"] is None:
            raise ApiError(400, "a form part without a Content-Disposition header", "body")
        _, opts = parse_options_header(state["disposition"].decode("latin-1"))
        if b"name" not in opts:
            raise ApiError(400, "a form part without a name", "body")
        name = opts[b"name"].decode("utf-8", "replace")
        if name == "file":
            state["files"] += 1
            if state["files"] > MAX_FILES:
                raise ApiError(413, f"more than {MAX_FILES} files in one request", "file")
        elif len(parts) - state["files"] + 1 > MAX_FORM_FIELDS:
            raise ApiError(400, f"more than {MAX_FORM_FIELDS} form fields", "body")
        parts.append(Part(name, opts.get(b"filename"), b""))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["chunks"].append(data[start:end])

    def on_part_end() -> None:
        if parts:
            parts[-1].data = b"".join(state["chunks"])
        state["chunks"] = []

    def on_end() -> None:
        state["ended"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                 "on_part_end": on_part_end, "on_end": on_end}  # fmt: skip
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # python_multipart's parse errors
        raise ApiError(400, f"malformed multipart body ({type(e).__name__})", "body") from None
    if not state["ended"]:
        raise ApiError(400, "the multipart body ends before its closing boundary", "body")
    return parts


def file_name(part: Part) -> str:
    if part.filename is None:
        raise ApiError(400, "a file part needs a filename (Content-Disposition: form-data; name=\"file\"; "
                            "filename=\"...\")", "file")
    try:
        name = part.filename.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "a filename is not UTF-8", "file") from None
    if len(name) > MAX_FILENAME_CHARS:
        raise ApiError(400, f"a filename is longer than {MAX_FILENAME_CHARS} characters", "file")
    return name


async def check_images(pool, images: list[bytes]) -> list[ImageError | None]:
    """Each image's reason to be refused (an :class:`ImageError`), or None when it may go to the model,
    checked in ``pool``'s worker processes (a ``model.decode_pool.DecodePool``); 413 when their headers
    declare more than ``MAX_REQUEST_PIXELS`` in all (an image refused after its header was read counts
    what it declared)."""

    async def one(data: bytes) -> tuple[int, ImageError | None]:
        try:
            w, h = await pool.check_async(data)
            return w * h, None
        except ImageError as e:
            w, h = e.declared or (0, 0)
            return w * h, e

    checked = await asyncio.gather(*map(one, images))
    if sum(pixels for pixels, _ in checked) > MAX_REQUEST_PIXELS:
        raise ApiError(413, f"the images hold more than {MAX_REQUEST_PIXELS} pixels in all", "file")
    return [refusal for _, refusal in checked]


def is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def is_urlencoded(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded"


# -- the deployment --------------------------------------------------------------------------------------
@serve.deployment
@serve.ingress(api)
class TaggerAPI:
    def __init__(self, model: DeploymentHandle, consumer: DeploymentHandle | None, settings: dict):
        from deploy.runtime import start_metrics
        from deploy.settings import ServeSettings
        from model.decode_pool import DecodePool

        self.settings = ServeSettings(**settings)
        # first: a keys file that cannot be used stops the start-up, before anything else is set up
        self.keys = load_api_keys(self.settings.api_keys_file) if self.settings.api_keys_file else None
        self.model, self.consumer, self.limit = model, consumer, self.settings.max_request_bytes
        self.slots = asyncio.Semaphore(max(1, self.settings.http_max_concurrency))
        self.checker = DecodePool(CHECK_WORKERS)  # header and structure checks only
        self.metrics = start_metrics()
        # it logs a warning per malformed byte of a body: a client could fill the logs (400s are counted)
        logging.getLogger("python_multipart").setLevel(logging.ERROR)
        if self.keys is not None:
            log.info("API keys required (%d keys from %s)", len(self.keys), self.settings.api_keys_file)

    # -- the frame of every request but /health -----------------------------------------------------------
    async def _serve(self, endpoint: str, request: Request, work) -> JSONResponse:
        """Authentication, a slot, the work; every answer is counted by its code."""
        t0 = time.perf_counter()
        code = "500"
        try:
            try:
                self._authenticate(request)
                async with self._slot():
                    response = await work(request)
            except ApiError as e:
                response = e.response()
            except Exception:
                log.exception("%s failed", endpoint)
                response = ApiError(500, "internal error").response()
            code = str(response.status_code)
            return response
        except asyncio.CancelledError:  # the client went away (the proxy cancels the request)
            code = "499"
            raise
        finally:
            self.metrics.HTTP_REQUESTS.labels(endpoint, code).inc()
            self.metrics.HTTP_SECONDS.labels(endpoint).observe(time.perf_counter() - t0)

    def _authenticate(self, request: Request) -> None:
        if self.keys is None:
            return
        key = presented_key(request.headers.getlist("authorization"),
                            parse_query(request.scope.get("query_string", b"")))  # fmt: skip
        if key is None or not key_matches(key, self.keys):
            raise ApiError(401, "an API key is needed (Authorization: Bearer KEY, Basic login:KEY, or ?api_key=KEY)",
                           "authorization",
                           {"WWW-Authenticate": 'Bearer realm="danmul", Basic realm="danmul"', **_CLOSE})

    @contextlib.asynccontextmanager
    async def _slot(self):
        try:
            async with asyncio.timeout(ADMISSION_WAIT_S):
                await self.slots.acquire()
        except TimeoutError:
            raise ApiError(503, "too many requests in progress; retry later", None,
                           {"Retry-After": str(RETRY_AFTER_S), **_CLOSE}) from None
        try:
            yield
        finally:
            self.slots.release()

    async def _read_body(self, request: Request) -> bytes:
        """The whole body within ``http_read_timeout_s`` in all (408 otherwise), refusing (413) anything
        over ``max_request_bytes`` without reading past it."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not re.fullmatch(r"[0-9]{1,19}", declared.strip()):
                raise ApiError(400, "Content-Length is not a number", "content-length", _CLOSE)
            if int(declared) > self.limit:
                raise ApiError(413, f"the request body is over {self.limit} bytes", "body", _CLOSE)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.http_read_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.limit:
                        raise ApiError(413, f"the request body is over {self.limit} bytes", "body", _CLOSE)
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.settings.http_read_timeout_s:g} s",
                           "body", _CLOSE) from None
        except ClientDisconnect:
            raise ApiError(400, "the connection closed before the whole body arrived", "body", _CLOSE) from None
        return b"".join(chunks)

    async def _call_model(self, calls: list):
        """The model's answers to ``calls`` (awaitables); a replica that died, or none answering in time,
        is a 503."""
        try:
            async with asyncio.timeout(self.settings.model_timeout_s):
                return await asyncio.gather(*calls)
        except Exception as e:
            log.warning("model call failed: %s", type(e).__name__)
            raise ApiError(503, f"the model cannot answer now ({type(e).__name__}); retry later", None,
                           {"Retry-After": str(RETRY_AFTER_S)}) from None

    # -- endpoints ----------------------------------------------------------------------------------------
    @api.post("/evaluate")
    async def evaluate(self, request: Request) -> JSONResponse:
        return await self._serve("evaluate", request, self._evaluate)

    async def _evaluate(self, request: Request) -> JSONResponse:
        query = parse_query(request.scope.get("query_string", b""))
        ctype = request.headers.get("content-type", "")
        if not is_multipart(ctype):
            raise ApiError(400, "send the images as multipart/form-data parts named 'file'", "file", _CLOSE)
        parts = await asyncio.to_thread(parse_multipart, await self._read_body(request), ctype)
        params = collect([*query, *[(p.name, p.data) for p in parts if p.name != "file"]], EVALUATE_PARAMS)
        threshold = parse_threshold(params, EVALUATE_THRESHOLD)
        limit = parse_int(params, "limit", 1, LIMIT_MAX, EVALUATE_LIMIT)
        parse_format(params)  # html is answered with the same JSON
        files = [(file_name(p), p.data) for p in parts if p.name == "file"]
        if not files:
            raise ApiError(400, "no file in the request (multipart part 'file')", "file")
        refused = await check_images(self.checker, [data for _, data in files])
        top_k = min(limit, TOP_K_MAX)  # characters listed: more than this is never useful
        sent = [i for i, refusal in enumerate(refused) if refusal is None]
        answers = await self._call_model([self.model.tag.remote(files[i][1], None, threshold, top_k) for i in sent])
        results: list[dict] = [{"error": refusal.reason} if refusal else {} for refusal in refused]
        for i, r in zip(sent, answers, strict=True):
            results[i] = r
        out = []
        for (name, _), r in zip(files, results, strict=True):
            if "error" in r:
                out.append({"filename": name, "tags": {}, "error": r["error"]})
                continue
            # characters first: a character's softmax score is on another scale than a tag's sigmoid,
            # and the character is what a tagger is asked for most
            ranked = [*r["characters"], *sorted(r["tags"].items(), key=lambda kv: -kv[1])]
            out.append({"filename": name, "tags": dict(ranked[:limit])})
        return JSONResponse(out)

    @api.post("/v1/tag")
    async def tag(self, request: Request) -> JSONResponse:
        return await self._serve("v1_tag", request, self._tag)

    async def _tag(self, request: Request) -> JSONResponse:
        query = parse_query(request.scope.get("query_string", b""))
        ctype = request.headers.get("content-type", "")
        if is_urlencoded(ctype):
            raise ApiError(400, "send the image as a multipart part 'file' or as the raw body", "file", _CLOSE)
        body = await self._read_body(request)
        if is_multipart(ctype):
            parts = await asyncio.to_thread(parse_multipart, body, ctype)
            files = [p for p in parts if p.name == "file"]
            if len(files) != 1:
                raise ApiError(400, "send exactly one multipart part 'file'", "file")
            file_name(files[0])
            image = files[0].data
            pairs = [*query, *[(p.name, p.data) for p in parts if p.name != "file"]]
        else:
            image, pairs = body, query
        params = collect(pairs, TAG_PARAMS)
        threshold = parse_threshold(params, None)
        top_k = parse_int(params, "top_k", 1, TOP_K_MAX, None)
        tags = parse_tags(params)
        if not image:
            raise ApiError(400, "empty image", "file")
        [refusal] = await check_images(self.checker, [image])
        if refusal is not None:
            return JSONResponse({"error": refusal.reason, "detail": refusal.detail, "field": "file"}, 422)
        [r] = await self._call_model([self.model.tag.remote(image, tags, threshold, top_k)])
        if "error" in r:
            return JSONResponse({"error": r["error"], "detail": r.get("detail", ""), "field": "file"}, 422)
        r.pop("batch_size", None)
        return JSONResponse(r)

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 while the model answers and a consumer reads Redis; 503 with the reason otherwise (no model
        replica, Redis away or refusing the credentials: the stream is not being processed)."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                info = await self.model.info.remote()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "error": type(e).__name__}, status_code=503)
        body = {"status": "ok", **info}
        if self.consumer is not None:
            try:
                async with asyncio.timeout(HEALTH_TIMEOUT_S):
                    body["consumer"] = await self.consumer.status.remote()
            except Exception as e:
                body["consumer"] = {"error": type(e).__name__}
            redis_state = body["consumer"].get("redis", body["consumer"].get("error"))
            if redis_state != "ok":
                body["status"] = "unavailable"
                body["error"] = f"the queue consumer cannot work: {redis_state}"
                return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    def __del__(self) -> None:  # Serve's stop: the check workers go with the replica
        if hasattr(self, "checker"):
            self.checker.close()
