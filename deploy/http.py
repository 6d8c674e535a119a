"""The HTTP API of the streaming tagger (a Serve ingress deployment over FastAPI).

- ``POST /evaluate``: Danbooru's autotagger protocol, so a Danbooru instance can point its autotagger
  URL here. Multipart ``file`` (one or several), ``threshold`` (default 0.1), ``limit`` (default 50),
  ``format`` (``json``; ``html`` is answered with the same JSON). Answer:
  ``[{"filename": name, "tags": {tag: score, ...}}]``: character tags first (best first), then general
  tags by score, ``limit`` in all. A file
  that is not a usable image gets ``"tags": {}`` and an ``"error"`` reason code; the others still
  answer.
- ``POST /v1/tag``: one image (multipart ``file``, or the raw body with an ``image/*`` content type)
  with optional ``tags`` (space-separated), ``threshold``, ``top_k``; answers the full result
  (characters, tags, model, abstained, best_character).
- ``GET /health``: the model version and a consumer's status; 503 while the model cannot answer.

Request bodies are bounded (``max_request_bytes``): a larger one is refused with 413 before it is read.
"""


import time
from contextlib import contextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

MAX_FILES = 16
EVALUATE_THRESHOLD = 0.1  # Danbooru autotagger's defaults
EVALUATE_LIMIT = 50

api = FastAPI(title="danmul", description="Anime character identification and Danbooru tag prediction")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything over ``limit`` without reading past it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes):
    """Multipart/urlencoded form of an already-read (bounded) body."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, receive).form(max_files=MAX_FILES, max_fields=64)
    except Exception as e:  # malformed multipart, too many parts
        raise HTTPException(400, f"cannot parse the form: {e}") from None


def _number(form, name: str, default: float, cast=float):
    raw = form.get(name) if form is not None else None
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number") from None


def _tags(text: str | None) -> list[str] | None:
    from model.vocab import parse_tag_string

    if not text:
        return None
    try:
        return parse_tag_string(text) or None
    except ValueError as e:
        raise HTTPException(400, f"bad tags: {e}") from None


@serve.deployment
@serve.ingress(api)
class TaggerAPI:
    def __init__(self, model: DeploymentHandle, consumer: DeploymentHandle | None, max_request_bytes: int):
        from deploy.app import start_metrics

        self.model, self.consumer, self.limit = model, consumer, max_request_bytes
        self.m = start_metrics()

    @contextmanager
    def _observe(self, endpoint: str):
        t0 = time.perf_counter()
        code = "500"
        try:
            yield
            code = "200"
        except HTTPException as e:
            code = str(e.status_code)
            raise
        finally:
            self.m.HTTP_REQUESTS.labels(endpoint, code).inc()
            self.m.HTTP_SECONDS.labels(endpoint).observe(time.perf_counter() - t0)

    @api.post("/evaluate")
    async def evaluate(self, request: Request) -> JSONResponse:
        with self._observe("evaluate"):
            form = await parse_form(request, await read_body(request, self.limit))
            threshold = _number(form, "threshold", EVALUATE_THRESHOLD)
            limit = int(_number(form, "limit", EVALUATE_LIMIT, int))
            files = [f for f in form.getlist("file") if hasattr(f, "read")]
            if not files:
                raise HTTPException(400, "no file in the request (multipart field 'file')")
            out = []
            for f in files:
                r = await self.model.tag.remote(await f.read(), None, threshold, limit)
                if "error" in r:
                    out.append({"filename": f.filename, "tags": {}, "error": r["error"]})
                    continue
                # characters first: a character's softmax score is on another scale than a tag's sigmoid,
                # and the character is what a tagger is asked for most
                ranked = [*r["characters"], *sorted(r["tags"].items(), key=lambda kv: -kv[1])]
                out.append({"filename": f.filename, "tags": dict(ranked[:limit])})
            return JSONResponse(out)

    @api.post("/v1/tag")
    async def tag(self, request: Request) -> JSONResponse:
        with self._observe("v1_tag"):
            body = await read_body(request, self.limit)
            ctype = request.headers.get("content-type", "")
            if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                form = await parse_form(request, body)
                f = form.get("file")
                if not hasattr(f, "read"):
                    raise HTTPException(400, "no file in the request (multipart field 'file')")
                image, params = await f.read(), form
            else:
                image, params = body, request.query_params
            if not image:
                raise HTTPException(400, "empty image")
            threshold = _number(params, "threshold", None)
            top_k = int(_number(params, "top_k", 5, int))
            r = await self.model.tag.remote(image, _tags(params.get("tags")), threshold, top_k)
            if "error" in r:
                raise HTTPException(422, f"{r['error']}: {r.get('detail', '')}")
            r.pop("batch_size", None)
            return JSONResponse(r)

    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            info = await self.model.info.remote()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "error": type(e).__name__}, status_code=503)
        body = {"status": "ok", **info}
        if self.consumer is not None:
            try:
                body["consumer"] = await self.consumer.status.remote()
            except Exception as e:
                body["consumer"] = {"error": type(e).__name__}
        return JSONResponse(body)
