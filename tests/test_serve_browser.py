"""``faceattrs serve`` for real: the command on a free loopback port, the body limit over
a real socket, and the page in headless Chromium (Debian's ``chromium`` driven by
Playwright's Python package; the browser Playwright would download is never used)."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extra (fastapi, uvicorn)")
from conftest import child_env, descendants, outliving  # noqa: E402
from photo_helpers import png_header  # noqa: E402
from predict_helpers import make_run  # noqa: E402

import faceattrs  # noqa: E402

LIMIT_MB = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``faceattrs serve`` in a subprocess on 127.0.0.1; yields its base URL."""
    run = make_run(tmp_path_factory.mktemp("run"))
    port = free_port()
    env = dict(os.environ)
    src = str(Path(faceattrs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "faceattrs", "serve", "--model", str(run), "--port", str(port)]
    cmd += ["--max-upload-mb", str(LIMIT_MB), "--threads", "1"]
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if get_json(base + "/health")["status"] == "ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"faceattrs serve did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield base, log
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_start_up_prints_the_url(server):
    base, log = server
    assert f"faceattrs serve: {base}/" in log.read_text()


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ")[1])


def test_declared_oversize_body_is_refused_unread(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 31457280\r\n\r\n"
        )  # 30 MB announced, none sent
        assert _status(s) == 413


def test_streamed_oversize_body_is_refused_before_its_end(server):
    """A chunked body (no length given): the server answers 413 or drops the connection
    once it has read past the limit, long before the 30 MB are sent."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    chunk = os.urandom(256 * 1024)
    total, sent, status = 120, 0, None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(total):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += 1
                if select.select([s], [], [], 0.02)[0]:
                    status = _status(s)
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused: the server closed before reading the rest
    assert status in (413, None) and sent < total / 2, (status, sent)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc")
def test_server_processes_end_when_serve_is_killed(tmp_path):
    """``kill -9`` of ``faceattrs serve --workers 2``: its server processes (and the
    resource tracker) end within seconds instead of serving on as orphans."""
    run = make_run(tmp_path / "run", age=False)
    port = free_port()
    cmd = [sys.executable, "-m", "faceattrs", "serve", "--model", str(run), "--port", str(port)]
    cmd += ["--workers", "2", "--threads", "1"]
    env = {**child_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # answered by a server process: they are up
                if get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.2)
        children = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert len(children) >= 2  # two server processes and the resource tracker
    assert outliving(children, 5.0) == []


# ---------------------------------------------------------------- the page in a browser


def chromium_path() -> str | None:
    for name in (os.environ.get("FACEATTRS_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    pw = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run does it)")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_page_shows_boxes_labels_bars_and_grad_cam(server, browser, tmp_path, photos):
    base, _ = server  # photos: the shared photos (conftest; skips where they are absent)
    model = get_json(base + "/model")
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors, failed = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)
    page.goto(base + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('heads')")
    assert "50 megapixels each" in page.locator("#limits").inner_text()  # with its unit
    page.set_input_files("#file", [str(photos[0]), str(photos[1])])
    page.wait_for_function("document.querySelectorAll('.card .face').length >= 2", timeout=60_000)
    cards = page.locator(".card")
    assert cards.count() == 2
    # in the order chosen, not the reverse
    assert [cards.nth(i).locator("h2").inner_text().split(" ")[0] for i in range(2)] == [
        photos[0].name,
        photos[1].name,
    ]
    for i in range(2):
        card = cards.nth(i)
        boxes = card.locator(".face-box")
        assert boxes.count() == card.locator(".face").count() >= 1
        label = boxes.first.inner_text()
        assert label.startswith("0: ")
        gender, ethnicity = label[3:].split(", ")[:2]
        assert gender in model["heads"]["gender"] and ethnicity in model["heads"]["ethnicity"]
        face = card.locator(".face").first
        n_bars = 2 + 5 + len(model["age"]["bins"])
        assert face.locator(".bar").count() == n_bars
        assert "years" in face.inner_text()
        # the box lies on the photo, and the Grad-CAM overlay is a decoded picture
        box, img = boxes.first.bounding_box(), card.locator(".photo img").bounding_box()
        assert img["width"] > 50 and box["width"] > 10
        assert img["x"] - 1 <= box["x"] and box["x"] + box["width"] <= img["x"] + img["width"] + 1
        cam = face.locator("img.cam")
        assert cam.evaluate("i => i.complete && i.naturalWidth") > 0
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1000
    assert errors == [] and failed == []  # /favicon.ico included
    assert page.evaluate("fetch('/favicon.ico').then(r => r.status)") == 200


def test_page_explains_errors(server, browser, tmp_path):
    base, _ = server
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"not a photo either")
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((200, 200), 128, np.uint8)).save(grey)
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom((LIMIT_MB + 1) * 1024 * 1024))
    bomb = tmp_path / "bomb.png"  # a PNG header claiming 20000 x 20000 pixels
    bomb.write_bytes(png_header(20000, 20000))
    page = browser.new_page()
    # which files the page turned into pictures (a preview decodes the whole image)
    page.add_init_script(
        """window.previewed = [];
        const blobUrl = URL.createObjectURL;
        URL.createObjectURL = (f) => { window.previewed.push(f.name); return blobUrl(f); };"""
    )
    page.goto(base + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('heads')")
    chosen = [text, fake, grey, big, bomb]
    page.set_input_files("#file", [str(p) for p in chosen])
    page.wait_for_function(
        "document.querySelectorAll('.card .error, .card .reason').length === 5", timeout=60_000
    )
    cards = page.locator(".card")
    names = [cards.nth(i).locator("h2").inner_text().split(" ")[0] for i in range(5)]
    assert names == [p.name for p in chosen]  # in the order chosen
    msg = {n: cards.nth(i).locator(".error, .reason").inner_text() for i, n in enumerate(names)}
    assert msg["notes.txt"].startswith("Error 415: notes.txt: type 'text/plain'")
    assert msg["fake.jpg"].startswith("Error 400: fake.jpg: not an image")
    assert msg["grey.png"] == "No face: no face found."
    assert "over the upload limit of 2.0 MB" in msg["big.jpg"]
    # the bomb is refused from its header, never previewed; the limit has its unit
    assert msg["bomb.png"] == (
        "bomb.png: 20000x20000 is 400 megapixels, over the limit of 50 megapixels (not sent)."
    )
    assert page.evaluate("window.previewed") == ["grey.png"]  # and the others not before
    # a photo dropped on the drop zone goes the same way
    page.evaluate(
        """async (bytes) => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
            document.querySelector("#drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        list(grey.read_bytes()),
    )
    page.wait_for_function("document.querySelectorAll('.card').length === 6", timeout=60_000)
    dropped = page.locator(".card").first
    assert dropped.locator("h2").inner_text().startswith("dropped.png")
    dropped.locator(".reason").wait_for(timeout=60_000)
    page.screenshot(path=str(tmp_path / "errors.png"), full_page=True)
