"""The HTTP API's parsing of untrusted input, without Ray: parameters, query strings, multipart bodies,
API keys, image headers. The wiring (status codes over a real Serve app) is in
tests/integration/test_http_api.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import types
from types import SimpleNamespace

import pytest
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from urllib3 import encode_multipart_formdata

from deploy.http import (
    EVALUATE_PARAMS,
    MAX_FILES,
    MAX_REQUEST_PIXELS,
    TAG_PARAMS,
    ApiError,
    Part,
    check_images,
    collect,
    file_name,
    key_matches,
    load_api_keys,
    parse_format,
    parse_int,
    parse_multipart,
    parse_query,
    parse_tags,
    parse_threshold,
    presented_key,
)


def png(w: int, h: int, mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def refused(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


# -- scalar parameters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("0", 0.0), ("1", 1.0), ("0.25", 0.25), (".5", 0.5), ("1.", 1.0),
                                       ("+0.1", 0.1), ("1e-2", 0.01), (" 0.3 ", 0.3), ("5e-400", 0.0),
                                       ("", 0.1), ("  ", 0.1)])  # fmt: skip
def test_threshold_accepts_decimals_in_0_1(text, want):
    assert parse_threshold({"threshold": text}, 0.1) == pytest.approx(want)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1", "1.0000001", "2",
                                  "-0.0001", "0x1", "1_0", "٠.٥", "0.5.1", "abc", "1e", "e1", ".", "0,5",
                                  "0.5\x00", "0." + "1" * 5000])  # fmt: skip
def test_threshold_refuses_anything_else(text):
    e = refused(parse_threshold, {"threshold": text}, 0.1)
    assert e.status == 400 and e.field == "threshold"


def test_threshold_default_may_be_none():
    assert parse_threshold({}, None) is None


@pytest.mark.parametrize("text,want", [("1", 1), ("1000", 1000), ("+7", 7), ("050", 50), ("", 50)])
def test_limit_accepts_1_to_1000(text, want):
    assert parse_int({"limit": text}, "limit", 1, 1000, 50) == want


@pytest.mark.parametrize("text", ["0", "-1", "-1000000", "1001", "10" * 30, "1" * 5000, "1.5", "5.0", "1e3", "nan",
                                  "١٢", "0x10", "1_0", "ten"])  # fmt: skip
def test_limit_refuses_anything_else(text):
    e = refused(parse_int, {"limit": text}, "limit", 1, 1000, 50)
    assert e.status == 400 and e.field == "limit"


def test_format_json_or_html_only():
    assert parse_format({}) == "json"
    assert parse_format({"format": "html"}) == "html"
    assert parse_format({"format": "JSON"}) == "json"
    for bad in ["xml", "json ", "jsonp", "\x00"]:
        if bad.strip() == "json":
            continue
        assert refused(parse_format, {"format": bad}).field == "format"


def test_tags_go_through_the_tag_string_rules():
    assert parse_tags({"tags": "1girl  solo 1girl"}) == ["1girl", "solo"]
    assert parse_tags({"tags": ""}) is None and parse_tags({}) is None
    assert refused(parse_tags, {"tags": "x" * 201}).field == "tags"
    assert refused(parse_tags, {"tags": " ".join(["a"] * 1001)}).field == "tags"
    assert refused(parse_tags, {"tags": "a\x07b"}).field == "tags"


# -- where the parameters come from ----------------------------------------------------------------------
def test_query_strings_are_percent_decoded_and_bounded():
    assert parse_query(b"a=1&b=x+y%20z&&c&api_key=%FF") == [("a", b"1"), ("b", b"x y z"), ("c", b""),
                                                            ("api_key", b"\xff")]  # fmt: skip
    assert parse_query(b"%FF=1") == [("\ufffd", b"1")]  # names no parameter: ignored later
    e = refused(parse_query, b"&".join(b"p%d=1" % i for i in range(17)))
    assert e.status == 400 and e.field == "query"


def test_collect_keeps_known_names_once_utf8_and_bounded():
    assert collect([("threshold", b"0.5"), ("other", b"\xff"), ("other", b"x")], EVALUATE_PARAMS) == {
        "threshold": "0.5"}
    e = refused(collect, [("limit", b"5"), ("limit", b"6")], EVALUATE_PARAMS)
    assert (e.status, e.field) == (400, "limit")
    assert refused(collect, [("format", b"\xffjson")], EVALUATE_PARAMS).field == "format"
    assert refused(collect, [("top_k", b"1" * 65)], TAG_PARAMS).field == "top_k"
    assert collect([("tags", b"a " * 1000)], TAG_PARAMS)["tags"].startswith("a a")  # tags may be long


# -- multipart ---------------------------------------------------------------------------------------------
def multipart(fields) -> tuple[bytes, str]:
    return encode_multipart_formdata(fields)


def test_multipart_parts_files_and_fields():
    body, ctype = multipart([("file", ("a.jpg", b"\xff\xd8\r\n--x", "image/jpeg")), ("threshold", "0.5"),
                             ("file", ("b.png", b"", "image/png")), ("tags", b"1girl")])  # fmt: skip
    parts = parse_multipart(body, ctype)
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("file", b"a.jpg", b"\xff\xd8\r\n--x"), ("threshold", None, b"0.5"), ("file", b"b.png", b""),
        ("tags", None, b"1girl")]  # fmt: skip


def test_multipart_bounds_files_and_fields():
    body, ctype = multipart([("file", (f"{i}.jpg", b"x")) for i in range(MAX_FILES + 1)])
    e = refused(parse_multipart, body, ctype)
    assert (e.status, e.field) == (413, "file")
    body, ctype = multipart([("file", (f"{i}.jpg", b"x")) for i in range(MAX_FILES)])
    assert len(parse_multipart(body, ctype)) == MAX_FILES
    body, ctype = multipart([(f"f{i}", "1") for i in range(17)])
    assert refused(parse_multipart, body, ctype).status == 400


@pytest.mark.parametrize("body,ctype,field", [
    (b"junk", "multipart/form-data", "content-type"),  # no boundary
    (b"junk", "multipart/form-data; boundary=" + "b" * 201, "content-type"),
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc", "multipart/form-data; "
     "boundary=b", "body"),  # truncated: no closing boundary
    (b"--b\r\nContent-Type: text/plain\r\n\r\nabc\r\n--b--\r\n", "multipart/form-data; boundary=b", "body"),
    (b"--b\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--b--\r\n", "multipart/form-data; boundary=b", "body"),
    (b"not a multipart body at all", "multipart/form-data; boundary=b", "body"),
])  # fmt: skip
def test_malformed_multipart_is_400(body, ctype, field):
    e = refused(parse_multipart, body, ctype)
    assert (e.status, e.field) == (400, field)


def test_file_names():
    assert file_name(Part("file", "é.jpg".encode(), b"")) == "é.jpg"
    assert file_name(Part("file", b"", b"")) == ""
    for bad in [None, b"\xff.jpg", b"x" * 1025]:
        e = refused(file_name, Part("file", bad, b"x"))
        assert (e.status, e.field) == (400, "file")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.text(max_size=40))
def test_arbitrary_bodies_are_parsed_or_refused_with_400(body, boundary):
    ctype = f"multipart/form-data; boundary={boundary}"
    try:
        parse_multipart(b"--" + boundary.encode("utf-8", "replace") + b"\r\n" + body, ctype)
    except ApiError as e:
        assert e.status in (400, 413)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(EVALUATE_PARAMS | TAG_PARAMS)), st.binary(max_size=80)))
def test_arbitrary_values_are_accepted_or_refused_with_400(raw):
    try:
        params = collect(list(raw.items()), EVALUATE_PARAMS | TAG_PARAMS)
        threshold = parse_threshold(params, 0.1)
        assert threshold is None or 0 <= threshold <= 1
        limit = parse_int(params, "limit", 1, 1000, 50)
        assert 1 <= limit <= 1000
        top_k = parse_int(params, "top_k", 1, 100, None)
        assert top_k is None or 1 <= top_k <= 100
        assert parse_format(params) in ("json", "html")
        parse_tags(params)
    except ApiError as e:
        assert e.status == 400 and e.field in raw


# -- pixels -------------------------------------------------------------------------------------------------
def test_images_are_checked_in_worker_processes_and_their_declared_pixels_bounded():
    from hostile_images import big_eps, empty_app_markers_jpeg, repeated_scan_jpeg

    from model.decode_pool import DecodePool

    pool = DecodePool(2)
    try:
        def check(images: list[bytes]) -> list[str | None]:
            return [r and r.reason for r in asyncio.run(check_images(pool, images))]

        assert check([png(300, 200, "RGB"), b"not an image", b"", big_eps(), repeated_scan_jpeg(10_000),
                      empty_app_markers_jpeg(), png(7000, 7000)]) == [
            None, "not_an_image", "empty", "not_an_image", "too_complex", "too_complex", "decompression_bomb"]
        # what the headers declare counts, refused or not: 60 Mpx is under the bound, 65 Mpx over it
        assert check([png(6000, 5000), png(6000, 5000), b"garbage"]) == ["decompression_bomb"] * 2 + ["not_an_image"]
        with pytest.raises(ApiError) as e:
            asyncio.run(check_images(pool, [png(6000, 5000), png(6000, 5000), png(1000, 5000)]))
        assert (e.value.status, e.value.field) == (413, "file")
        # over Pillow's own bound (2 x 89 Mpx) the size is never read: refused as a bomb, not counted
        assert check([png(20_000, 10_000)]) == ["decompression_bomb"]
        assert MAX_REQUEST_PIXELS == 64_000_000
    finally:
        pool.close()


def test_no_interactive_documentation_is_served():
    from deploy.http import api

    assert api.docs_url is None and api.redoc_url is None and api.openapi_url is None
    paths = {getattr(route, "path", None) for route in api.routes}
    assert not paths & {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}, paths


# -- API keys -------------------------------------------------------------------------------------------------
def test_keys_file_keeps_digests_only(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# the keys\n\n  alpha-key  \nbeta key\n#gamma\n")
    digests = load_api_keys(str(path))
    assert digests == [hashlib.sha256(b"alpha-key").digest(), hashlib.sha256(b"beta key").digest()]
    assert key_matches(b"alpha-key", digests) and key_matches(b"beta key", digests)
    assert not key_matches(b"gamma", digests) and not key_matches(b"alpha-key ", digests)
    assert not key_matches(b"", digests)


@pytest.mark.parametrize("content", [None, "", "\n\n   \n", "# only a comment\n", b"\xff\xfe key"])
def test_unusable_keys_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "keys.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=r"API keys file .*keys\.txt"):
        load_api_keys(str(path))


def test_keys_file_that_is_a_folder_or_huge_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_api_keys(str(tmp_path))
    (tmp_path / "big").write_bytes(b"k" * (2 << 20))
    with pytest.raises(ValueError, match="big is over"):
        load_api_keys(str(tmp_path / "big"))


def basic(login: bytes, key: bytes) -> str:
    return "Basic " + base64.b64encode(login + b":" + key).decode()


def test_presented_keys():
    assert presented_key(["Bearer k1"], []) == b"k1"
    assert presented_key(["bearer   k1 "], []) == b"k1"
    assert presented_key([basic(b"alice", b"k2")], []) == b"k2"
    assert presented_key([basic(b"", b"k:3")], []) == b"k:3"
    assert presented_key(["Bearer \xe9"], []) == b"\xe9"  # header bytes as sent (latin-1 in ASGI)
    assert presented_key([], [("login", b"alice"), ("api_key", b"k4")]) == b"k4"
    assert presented_key(["Bearer k1"], [("api_key", b"k4")]) == b"k1"  # the header wins
    for auth, query in [([], []), (["Bearer"], []), (["Bearer "], []), (["Token k1"], []), (["k1"], []),
                        (["Basic !!!"], []), (["Basic " + base64.b64encode(b"nocolon").decode()], []),
                        ([basic(b"alice", b"")], []), (["Bearer a", "Bearer b"], []),
                        ([], [("api_key", b"a"), ("api_key", b"b")]), ([], [("api_key", b"")])]:  # fmt: skip
        assert presented_key(auth, query) is None, (auth, query)


# -- the request frame: status codes and their counts, without Serve ------------------------------------------
class FakeMetrics:
    def __init__(self):
        self.codes: list[tuple[str, str]] = []
        outer = self

        class Requests:
            def labels(self, endpoint, code):
                outer.codes.append((endpoint, code))
                return SimpleNamespace(inc=lambda: None)

        self.HTTP_REQUESTS = Requests()
        self.HTTP_SECONDS = SimpleNamespace(labels=lambda endpoint: SimpleNamespace(observe=lambda v: None))


def frame():
    """The deployment's own methods on a stand-in for a replica (no keys, one slot)."""
    from deploy.http import TaggerAPI

    cls = TaggerAPI.func_or_class
    api = SimpleNamespace(settings=SimpleNamespace(model_timeout_s=5.0), keys=None, metrics=FakeMetrics())
    api.slots = asyncio.Semaphore(1)
    for name in ("_authenticate", "_slot", "_call_model", "_serve"):
        setattr(api, name, types.MethodType(getattr(cls, name), api))
    return api


def test_every_answer_is_counted_by_its_code_and_model_failures_are_503():
    api = frame()

    async def ok(request):
        return JSONResponse({})

    async def bad(request):
        raise ApiError(400, "limit must be between 1 and 1000", "limit")

    async def bug(request):
        raise KeyError("x")

    async def replica_died(request):
        async def call():
            raise RuntimeError("the actor died")

        return await api._call_model([call()])

    async def main():
        codes = [(await api._serve("evaluate", None, work)).status_code for work in (ok, bad, bug, replica_died)]
        died = await api._serve("evaluate", None, replica_died)
        assert died.headers["Retry-After"] == "1" and json.loads(died.body) == {
            "error": "the model cannot answer now (RuntimeError); retry later", "field": None}
        # a request that finds the slot taken waits a moment, then is told to come back
        await api.slots.acquire()
        busy = await api._serve("v1_tag", None, ok)
        api.slots.release()
        # a client that goes away: the proxy cancels the request
        task = asyncio.create_task(api._serve("v1_tag", None, lambda request: asyncio.sleep(30)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return codes, busy

    codes, busy = asyncio.run(main())
    assert codes == [200, 400, 500, 503]
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert api.metrics.codes == [("evaluate", "200"), ("evaluate", "400"), ("evaluate", "500"), ("evaluate", "503"),
                           ("evaluate", "503"), ("v1_tag", "503"), ("v1_tag", "499")]  # fmt: skip
    assert api.slots._value == 1  # every slot given back
