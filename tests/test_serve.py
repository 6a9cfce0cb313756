"""The HTTP API (``faceattrs.serve``) with FastAPI's test client on a tiny random-init
bundle: records as ``FaceAnalyzer`` gives them, every error case, the body limit while
streaming, the bounded queue (503) and concurrent requests batched without mixing."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("multipart", reason="serving needs python-multipart (the 'serve' extra)")
from fastapi.testclient import TestClient  # noqa: E402

from faceattrs.bundle import NAMED_MODELS  # noqa: E402

UTK48 = NAMED_MODELS["utk48"]  # the bundled 48x48 model (v5), an ensemble of two networks
from faceattrs.cli import main  # noqa: E402
from faceattrs.predict import FaceAnalyzer  # noqa: E402
from faceattrs.serve import (  # noqa: E402
    WEB_DIR,
    ApiError,
    BodyLimit,
    Job,
    ModelWorker,
    ServeConfig,
    Upload,
    create_app,
)

# run_dir (the tiny bundle, gender calibrated at 2) and photos are conftest's session
# fixtures: the tests only read them.


@pytest.fixture(scope="module")
def analyzer(run_dir) -> FaceAnalyzer:
    return FaceAnalyzer(run_dir)


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(ServeConfig(model=str(run_dir)))) as c:
        yield c


@pytest.fixture(scope="module")
def strict(analyzer):
    """An app with small limits (64 KB, 1 megapixel, 2 images) around the same analyzer."""
    cfg = ServeConfig(max_upload_bytes=64 * 1024, max_pixels=1_000_000, max_images=2)
    with TestClient(create_app(cfg, analyzer=analyzer)) as c:
        yield c


def png(size=(200, 200), value=128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def post(client, *files, query=""):
    parts = [("file", f) for f in files]
    return client.post("/analyze" + query, files=parts)


def assert_error(r, status: int, pattern: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and re.search(pattern, body["error"]), body
    assert "\n" not in body["error"] and "(none)" not in body["error"]  # one clear line
    assert "Traceback" not in r.text and 'File "' not in r.text


# ---------------------------------------------------------------- answers


def test_records_are_the_analyzers(client, analyzer, photos):
    """One shared photo in, the records of FaceAnalyzer out (file = the upload's name)."""
    for p in photos[:3]:
        r = post(client, (p.name, p.read_bytes(), "image/jpeg"))
        assert r.status_code == 200, r.text
        [image] = r.json()["images"]
        expected = analyzer.analyze(p.read_bytes())
        for rec in expected:
            rec.pop("image")
            rec["file"] = p.name
        assert image["file"] == p.name and image["faces"] == expected and expected


def test_several_images_in_order_and_raw_bytes(client, photos):
    r = post(client, *[(p.name, p.read_bytes(), "image/jpeg") for p in photos[:4]])
    assert r.status_code == 200
    images = r.json()["images"]
    assert [im["file"] for im in images] == [p.name for p in photos[:4]]
    raw = client.post(
        "/analyze?name=x.jpg",
        content=photos[1].read_bytes(),
        headers={"content-type": "image/jpeg"},
    )
    assert raw.status_code == 200
    assert raw.json()["images"][0]["faces"][0]["gender"] == images[1]["faces"][0]["gender"]


def test_explain_adds_a_png_overlay_per_face(client, photos):
    r = post(client, (photos[0].name, photos[0].read_bytes(), "image/jpeg"), query="?explain=1")
    assert r.status_code == 200 and r.json()["explain"] is True
    for rec in r.json()["images"][0]["faces"]:
        head, data = rec["explain"].split(",", 1)
        assert head == "data:image/png;base64"
        im = Image.open(io.BytesIO(base64.b64decode(data)))
        assert im.format == "PNG" and im.size[0] == 3 * im.size[1] - 3 * 22  # 3 panels + captions
    plain = post(client, (photos[0].name, photos[0].read_bytes(), "image/jpeg")).json()
    assert "explain" not in plain["images"][0]["faces"][0]


def test_no_face_is_200_with_a_reason(client):
    r = post(client, ("grey.png", png(), "image/png"))
    assert r.status_code == 200
    assert r.json()["images"] == [{"file": "grey.png", "faces": [], "reason": "no face found"}]


def test_health_model_and_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    m = client.get("/model").json()
    assert m["heads"]["gender"] == ["Male", "Female"] and len(m["heads"]["ethnicity"]) == 5
    assert m["age"]["bins"][0] == "0-16" and m["temperatures"] == {"gender": 2.0}
    assert m["limits"]["max_upload_bytes"] == 10 * 1024 * 1024
    assert m["checkpoint"]["epoch"] == 0
    assert m["licence"] is None  # a trained run folder records no terms
    assert m["input"] == {"size": 48, "channels": 1, "mean": [0.5], "std": [0.5], "crop": "utkface"}
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/analyze"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_model_of_the_bundled_ensemble():
    """The bundled 48x48 model is an ensemble of two networks: /model gives each member's
    epoch and score (best.json), the whole validation split's mean macro-F1
    (calibration.json) and, apart, the packaging check (provenance.json), never an empty
    checkpoint."""
    best = json.loads((UTK48 / "best.json").read_text())
    check = json.loads((UTK48 / "provenance.json").read_text())["check"]
    cal = json.loads((UTK48 / "calibration.json").read_text())
    with TestClient(create_app(ServeConfig(model="utk48"))) as c:
        m = c.get("/model").json()
    assert m["source"] == str(UTK48.resolve()) and m["backend"] == "torch"
    # the terms it is shipped under, as the model folder records them
    assert m["licence"] == json.loads((UTK48 / "provenance.json").read_text())["licence"]
    assert "non-commercial research only" in m["licence"]
    members = m["checkpoint"]["members"]
    assert [(x["epoch"], x["score"]) for x in members] == [
        (b["epoch"], b["score"]) for b in best["members"]
    ]
    assert len(members) == 2 and all(x["epoch"] > 0 and 0.5 < x["score"] < 1 for x in members)
    metrics = m["metrics"]
    # the packaging check (512 faces, a check of the files) is apart, never "validation"
    assert metrics["validation"] == {} and metrics["packaging_check"] == check
    chosen = "flip" if cal["flip_tta"] else "plain"
    assert metrics["validation_mean_macro_f1"] == {
        "value": cal["flip_tta_selection"]["val_score"][chosen],
        "n": cal["heads"]["gender"]["val"]["n"],
    }
    # the ensemble scores above each of its members, on the same split and measure
    assert metrics["validation_mean_macro_f1"]["value"] > max(x["score"] for x in members)


def test_int8_serves_the_bundled_int8_model():
    """--model utk48 --dtype int8: the bundled int8 export through onnxruntime, the same
    answers' form, and /model says so; on another device it is one clear error."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    sample = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
    with TestClient(create_app(ServeConfig(model="utk48", dtype="int8"))) as c:
        m = c.get("/model").json()
        assert m["backend"] == "onnx" and m["dtype"] == "int8"
        # the run it was exported from, resolved (the manifest says "../utk48_model")
        assert m["source"] == str(UTK48.resolve()) and Path(m["source"]).is_absolute()
        assert len(m["checkpoint"]["members"]) == 2  # that run's checkpoint
        r = post(c, ("a.jpg", sample.read_bytes(), "image/jpeg"))
        assert r.status_code == 200, r.text
        (face,) = r.json()["images"][0]["faces"]
        assert face["gender"]["label"] in ("Male", "Female") and "interval" in face["age"]
        r = post(c, ("a.jpg", sample.read_bytes(), "image/jpeg"), query="?explain=1")
        assert_error(r, 501, "explanations need the PyTorch model")  # Grad-CAM: torch
    from faceattrs.exceptions import FaceattrsError

    with pytest.raises(FaceattrsError, match="runs on the CPU"):
        ServeConfig(dtype="int8", device="cuda").check()
    with pytest.raises(FaceattrsError, match="fp32, bf16 or int8"):
        ServeConfig(dtype="fp16").check()


def test_page_is_served_and_needs_no_internet(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    # the page says under which terms the model's answers are given
    assert "for non-commercial research only" in " ".join(page.text.split())
    for name in ("index.html", "app.js", "app.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200
        # no CDN script, font or style: every URL the page loads is on this server
        assert not re.search(
            r"""(src|href)=["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", r.text
        )
    assert sorted(p.name for p in WEB_DIR.iterdir()) == [
        "app.css", "app.js", "favicon.svg", "index.html"
    ]  # fmt: skip
    # where browsers ask for the page's icon: no 404
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.startswith("<svg")


# ---------------------------------------------------------------- errors


def test_bad_images_are_400(client, photos):
    data = photos[0].read_bytes()
    assert_error(post(client, ("a.jpg", b"", "image/jpeg")), 400, r"^a\.jpg: empty file")
    assert_error(
        post(client, ("b.jpg", b"hello, not a picture", "image/jpeg")),
        400,
        r"^b\.jpg: not an image",
    )
    assert_error(
        post(client, ("c.jpg", data[: len(data) // 2], "image/jpeg")),
        400,
        r"^c\.jpg: truncated or corrupt",
    )
    # one bad image among good ones fails the request, naming it
    r = post(client, ("ok.jpg", data, "image/jpeg"), ("d.jpg", data[:300], "image/jpeg"))
    assert_error(r, 400, r"^d\.jpg: ")
    assert_error(client.post("/analyze", files={"note": (None, "text")}), 400, "no image")
    # no body at all (no type either), or an empty body of another type: no image, 400
    no_body = r"^no image in the request \(empty body\): send multipart/form-data"
    assert_error(client.post("/analyze"), 400, no_body)
    empty_json = client.post("/analyze", content=b"", headers={"content-type": "application/json"})
    assert_error(empty_json, 400, no_body)
    assert_error(
        client.post("/analyze?explain=maybe", content=data, headers={"content-type": "image/jpeg"}),
        400,
        "explain",
    )


def test_unsupported_types_are_415(client, photos):
    assert_error(
        post(client, ("notes.txt", b"some text", "text/plain")),
        415,
        r"^notes\.txt: type 'text/plain'",
    )
    assert_error(post(client, ("v.svg", b"<svg/>", "image/svg+xml")), 415, "image/svg")
    r = client.post("/analyze", content=b'{"a": 1}', headers={"content-type": "application/json"})
    assert_error(r, 415, "application/json")
    no_type = client.post("/analyze", content=photos[0].read_bytes())
    assert_error(no_type, 415, r"^no Content-Type header: send multipart/form-data")


def test_limits_are_413(strict, photos):
    big = np.random.default_rng(0).integers(0, 256, (300, 300), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")  # about 90 KB: over 64 KB
    assert_error(post(strict, ("big.png", buf.getvalue(), "image/png")), 413, "upload too large")
    # 1500x1000 of one grey compresses to a few KB: under the byte limit, over the pixel limit
    assert_error(
        post(strict, ("wide.png", png((1500, 1000)), "image/png")),
        413,
        r"1500x1000 is 1\.5 megapixels, over the limit of 1 megapixels$",
    )
    three = [(p.name, p.read_bytes(), "image/jpeg") for p in photos[:3]]
    assert_error(post(strict, *three), 400, "(?i)too many files")
    assert post(strict, *three[:2]).status_code == 200


def test_stats_count_every_refused_request(analyzer):
    """stats.rejected counts each refused POST /analyze (400, 413 both from the header and
    while streaming, 415), not an analysed one nor another path; busy stays 0."""
    cfg = ServeConfig(max_upload_bytes=64 * 1024)
    with TestClient(create_app(cfg, analyzer=analyzer)) as c:
        assert c.get("/model").json()["stats"]["rejected"] == 0
        assert_error(c.post("/analyze"), 400, "no image")
        assert_error(post(c, ("b.jpg", b"not a picture", "image/jpeg")), 400, "not an image")
        assert_error(post(c, ("n.txt", b"some text", "text/plain")), 415, "text/plain")
        big = b"x" * (70 * 1024)
        declared = c.post("/analyze", content=big, headers={"content-type": "image/png"})
        assert_error(declared, 413, "upload too large")
        chunks = iter([big[: 40 * 1024], big[40 * 1024 :]])  # no Content-Length: chunked
        streamed = c.post("/analyze", content=chunks, headers={"content-type": "image/png"})
        assert_error(streamed, 413, "upload too large")
        assert post(c, ("grey.png", png(), "image/png")).status_code == 200
        assert_error(c.get("/analyze"), 405, "Method Not Allowed")  # not an analysis
        stats = c.get("/model").json()["stats"]
    assert stats["rejected"] == 5 and stats["busy"] == 0
    assert stats["requests"] == 1 and stats["images"] == 1


def test_unknown_path_and_method_are_json(client):
    assert_error(client.get("/nope"), 404, "Not Found")
    assert_error(client.get("/analyze"), 405, "Method Not Allowed")


def _asgi_call(app, chunks, headers=()):
    """Call an ASGI app directly; returns (status, number of body chunks it read)."""
    sent, out = [], {}

    async def receive():
        i = len(sent)
        sent.append(i)
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]

    scope = {"type": "http", "method": "POST", "path": "/analyze", "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return out["status"], len(sent)


def test_body_limit_refuses_while_streaming():
    """Reading stops past the limit plus what it drains; nothing past the limit is kept."""

    async def reader(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def app(scope, receive, send):  # the ApiError handler of the real app, in short
        try:
            await reader(scope, receive, send)
        except ApiError as e:
            await send({"type": "http.response.start", "status": e.status, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    limited = BodyLimit(app, max_bytes=1000, drain_bytes=1000)
    chunks = [b"x" * 400] * 10
    # 1200 bytes > 1000 at the 3rd chunk; 3 more (1200 > 1000) are dropped; 4 never read
    assert _asgi_call(limited, chunks) == (413, 6)
    assert _asgi_call(limited, chunks[:5]) == (413, 5)  # within the drain: read to its end
    assert _asgi_call(limited, chunks[:2]) == (200, 2)
    assert _asgi_call(BodyLimit(app, 1000, drain_bytes=0), chunks) == (413, 3)
    declared = [(b"content-length", b"4000")]
    assert _asgi_call(limited, chunks, declared) == (413, 0)  # refused unread
    declared = [(b"content-length", b"2000")]
    assert _asgi_call(limited, chunks[:5], declared) == (413, 5)  # drained, then refused


def test_images_are_decoded_within_the_pixel_budget(analyzer):
    """Waiting requests are analysed together, in runs of at most batch_pixels pixels."""
    runs = []

    class Recorder(SlowAnalyzer):
        def run(self, sources, keep_images=False, **kw):
            runs.append(len(sources))
            return super().run(sources, keep_images, **kw)

    rec = Recorder()
    rec.go.set()
    worker = ModelWorker(rec, ServeConfig(batch_pixels=1000))
    ups = [Upload(f"{i}.png", "image/png", b"x", pixels=p) for i, p in enumerate([400] * 5)]
    ups.append(Upload("big.png", "image/png", b"x", pixels=5000))
    out = worker.process([Job(ups[:3], False, None), Job(ups[3:], False, None)])
    assert runs == [2, 2, 1, 1]  # 400 + 400, 400 + 400, 400, then the big one alone
    assert [len(r) for r in out] == [3, 3] and out[1][2]["file"] == "big.png"


# ---------------------------------------------------------------- concurrency


class SlowAnalyzer:
    """Stands in for FaceAnalyzer: waits for ``go``, then raises or gives no face."""

    def __init__(self, fail=False):
        self.go, self.fail, self.calls = threading.Event(), fail, 0

    def run(self, sources, keep_images=False, **_):
        from faceattrs.predict import Item

        self.calls += 1
        self.go.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        for i, _ in enumerate(sources):
            yield Item(i, None, image=np.zeros((2, 2), np.uint8), error="image: no face found")


def test_full_queue_answers_503_with_retry_after():
    async def scenario():
        slow = SlowAnalyzer()
        worker = ModelWorker(slow, ServeConfig(queue_size=2, batch_images=1, retry_after=3))
        up = [Upload("a.png", "image/png", b"x")]
        tasks = [asyncio.create_task(worker.submit(up, False))]
        await asyncio.sleep(0.05)  # the first is with the model thread, the queue is empty
        tasks += [asyncio.create_task(worker.submit(up, False)) for _ in range(4)]
        await asyncio.sleep(0.05)
        slow.go.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await worker.stop()
        return results, worker.stats

    results, stats = asyncio.run(scenario())
    busy = [r for r in results if isinstance(r, ApiError)]
    assert len(busy) == 2 and stats["busy"] == 2  # 1 running + 2 waiting; 2 refused
    assert all(e.status == 503 and e.headers == {"Retry-After": "3"} for e in busy)
    assert [r for r in results if not isinstance(r, ApiError)] == [
        [{"file": "a.png", "faces": [], "reason": "no face found"}]
    ] * 3


def test_a_model_failure_is_500_without_a_trace(analyzer):
    slow = SlowAnalyzer(fail=True)
    slow.go.set()
    slow.models, slow.input = analyzer.models, analyzer.input
    slow.backend = "torch"
    with TestClient(create_app(ServeConfig(), analyzer=slow)) as c:
        r = post(c, ("g.png", png(), "image/png"))
        assert_error(r, 500, r"^internal error \(RuntimeError\)$")
        assert c.get("/health").status_code == 200  # and the server goes on


def test_concurrent_requests_are_batched_and_kept_apart(analyzer, photos):
    """12 requests at once, 3 images each of different photos: every answer is its own."""
    from faceattrs.serve import check_upload

    n = len(photos)
    requests = [[photos[(i + k) % n] for k in range(3)] for i in range(0, 24, 2)]
    expected = [[analyzer.analyze(p.read_bytes())[0]["gender"] for p in req] for req in requests]

    async def scenario():
        worker = ModelWorker(analyzer, ServeConfig(batch_images=8))
        jobs = []
        for req in requests:
            ups = [Upload(p.name, "image/jpeg", p.read_bytes()) for p in req]
            for u in ups:
                check_upload(u, 50_000_000)
            jobs.append(worker.submit(ups, False))
        out = await asyncio.gather(*jobs)
        await worker.stop()
        return out, worker.stats

    out, stats = asyncio.run(scenario())
    for req, res, exp in zip(requests, out, expected, strict=True):
        assert [im["file"] for im in res] == [p.name for p in req]
        assert [im["faces"][0]["gender"] for im in res] == exp
    assert stats["requests"] == 12 and stats["batches"] < 12  # taken together, 2 per batch


# ---------------------------------------------------------------- command line


def test_cli_bad_model_and_options_exit_2(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("faceattrs serve: error:") and "missing" in err[0]
    assert main(["serve", "--model", str(tmp_path), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err
    assert main(["serve", "--photo-set", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
