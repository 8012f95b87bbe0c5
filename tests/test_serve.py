"""imgclf serve: every endpoint and every bad request through TestClient, a real uvicorn under concurrent load,
SIGTERM, and the drop-an-image page in Debian's Chromium."""

import asyncio
import base64
import contextlib
import csv
import io
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import imgclf
from clitools import assert_clean_error
from clitools import imgclf as imgclf_cli
from imgclf.cli import main
from imgclf.errors import ConfigError
from imgclf.runs.base import load_run
from imgclf.serving import server as server_module
from imgclf.serving import service as service_module
from imgclf.serving.engine import predict_with_onnx
from imgclf.serving.export import export_run
from imgclf.serving.page import render_page
from imgclf.serving.server import ServeOptions, create_app, exposure_warning, listening_socket, serve, server_config
from imgclf.serving.service import Service

from conftest import tiny_config
from imagefactory import make_class_folders, pattern, to_pil

TestClient = pytest.importorskip("fastapi.testclient").TestClient
httpx = pytest.importorskip("httpx")
pytest.importorskip("onnxruntime")
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """A binary fp32 run with a chosen threshold, exported: both engines answer in fp32."""
    base = tmp_path_factory.mktemp("serve")
    data = make_class_folders(base / "data", per_class=12, classes=["normal", "pneumonia"])
    run = imgclf.train(tiny_config(data, base / "run", train={"epochs": 4, "precision": "fp32"},
                                   evaluate={"threshold": "youden"}))
    export_run(run)
    return run


def wait_until_ready(get, limit_s: float = 30) -> None:
    for _ in range(int(limit_s / 0.05)):  # bounded: a model that never loads fails the test
        if get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    pytest.fail("the model did not become ready")


@contextlib.contextmanager
def client_for(run, engine: str = "auto", **options):
    service = Service(run, engine, options.get("max_pixels", ServeOptions.max_pixels))
    with TestClient(create_app(service, ServeOptions(engine=engine, **options))) as client:
        wait_until_ready(client.get)
        yield client


@pytest.fixture(scope="module")
def client(binary_run):
    with client_for(binary_run) as c:
        yield c


def png_bytes(mode: str = "RGB", size: int = 24, label: int = 0) -> bytes:
    image = to_pil(pattern(label, size, np.random.default_rng(label)), "L" if mode == "LA" else mode)
    image = image.convert("LA") if mode == "LA" else image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
    return buffer.getvalue()


def files_of(run, n: int) -> list:
    index = run.index()
    return [index.abspath(i) for i in range(n)]


def csv_probs(path) -> dict:
    with open(path, newline="") as fh:
        return {r["path"]: [float(v) for k, v in r.items() if k.startswith("prob_")] for r in csv.DictReader(fh)}


def test_health_ready_and_model_endpoints(client, binary_run):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready", "engine": "onnx"}  # an export exists: onnx
    about = client.get("/v1/model").json()
    assert about["classes"] == ["normal", "pneumonia"] and about["image_size"] == 16 and about["channels"] == 3
    assert about["engine"] == "onnx" and about["threshold"] == binary_run.threshold
    assert about["positive_class"] == "pneumonia" and about["export"]["opset"] == 18
    assert about["validation"]["accuracy"] == binary_run.metrics["val"]["accuracy"]
    assert set(about["versions"]) == {"imgclf", "torch", "onnxruntime"}


def test_readyz_is_503_until_the_model_is_loaded(binary_run):
    service, release = Service(binary_run, "torch"), threading.Event()
    load = service.load
    service.load = lambda: (release.wait(30), load())
    with TestClient(create_app(service, ServeOptions())) as client:
        assert client.get("/readyz").status_code == 503 and client.get("/readyz").json()["status"] == "loading"
        assert client.get("/v1/model").status_code == 503
        assert client.post("/v1/predict", files={"file": ("a.png", png_bytes())}).status_code == 503
        assert client.get("/healthz").status_code == 200
        release.set()
        wait_until_ready(client.get)
        assert client.get("/readyz").json()["engine"] == "torch"


def test_without_an_export_the_torch_engine_is_loaded_once_and_warmed_up(binary_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(binary_run.path, copy, ignore=shutil.ignore_patterns("export"))
    opened, batches = [], []
    real_open = service_module.open_engine

    def counting_open(*args, **kwargs):
        engine = real_open(*args, **kwargs)
        real_predict = engine.predict
        engine.predict = lambda images: (batches.append(len(images)), real_predict(images))[1]
        opened.append(engine.name)
        return engine

    monkeypatch.setattr(service_module, "open_engine", counting_open)
    with client_for(load_run(copy)) as client:  # --engine auto
        assert client.get("/readyz").json() == {"status": "ready", "engine": "torch"}
        assert batches == [1]  # the warm-up image, before the first request
        for _ in range(2):
            assert client.post("/v1/predict", files={"file": ("a.png", png_bytes())}).status_code == 200
    assert opened == ["torch"] and batches == [1, 1, 1]


def test_serve_warns_before_listening_beyond_this_machine_without_a_token(binary_run, monkeypatch):
    """serve() itself, stopped where it would bind (nothing listens on 0.0.0.0 in a test)."""
    def stop(host, port):
        raise ConfigError(f"stopped before listening on {host}:{port}")

    monkeypatch.setattr(server_module, "listening_socket", stop)
    logger, collect = logging.getLogger("imgclf.serve"), Collect()
    logger.addHandler(collect)
    try:
        for token in (None, TOKEN):
            with pytest.raises(ConfigError, match="stopped before listening on 0.0.0.0:8000"):
                serve(binary_run, ServeOptions(host="0.0.0.0", token=token))
        with pytest.raises(ConfigError, match="stopped before listening on 127.0.0.1:8000"):
            serve(binary_run, ServeOptions())  # the default binds this machine only
    finally:
        logger.removeHandler(collect)
    assert [line for line in collect.lines if "without --token" in line] == [exposure_warning(
        ServeOptions(host="0.0.0.0"))]


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_server_probabilities_equal_imgclf_predict(binary_run, tmp_path, engine):
    paths = files_of(binary_run, 5)
    cli = ["predict", str(binary_run.path), *map(str, paths), "--out", str(tmp_path / "p.csv"), "--engine", engine]
    assert main(cli) == 0
    expected = csv_probs(tmp_path / "p.csv")
    with client_for(binary_run, engine) as client:
        answer = client.post("/v1/predict?top_k=2", files=[("file", (p.name, p.read_bytes())) for p in paths]).json()
    assert answer["engine"] == engine and len(answer["results"]) == 5
    for path, result in zip(paths, answer["results"], strict=True):
        got = {p["class"]: p["probability"] for p in result["top_k"]}
        np.testing.assert_allclose([got["normal"], got["pneumonia"]], expected[str(path)], atol=1e-6)


def test_predict_answers_label_top_k_and_the_threshold_decision(client, binary_run):
    paths = files_of(binary_run, 3)
    answer = client.post("/v1/predict?top_k=1", files=[("file", (p.name, p.read_bytes())) for p in paths]).json()
    for path, result in zip(paths, answer["results"], strict=True):
        decision = result["decision"]
        assert result["file"] == path.name and len(result["top_k"]) == 1
        assert decision["threshold"] == binary_run.threshold and decision["positive_class"] == "pneumonia"
        assert decision["positive"] == (decision["probability"] >= binary_run.threshold)
        assert result["label"] == ("pneumonia" if decision["positive"] else "normal")
        assert "gradcam" not in result


def test_explain_adds_a_gradcam_overlay_as_a_png_data_uri(client, binary_run):
    path = files_of(binary_run, 1)[0]
    result = client.post("/v1/predict?explain=true", files={"file": (path.name, path.read_bytes())}).json()
    uri = result["results"][0]["gradcam"]
    assert uri.startswith("data:image/png;base64,")
    overlay = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert overlay.format == "PNG" and overlay.width >= 16 and overlay.mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_image_modes_are_converted_by_the_training_rule(client, binary_run, tmp_path, mode):
    data = png_bytes(mode, label=1)
    (tmp_path / "x.img").write_bytes(data)
    expected = predict_with_onnx(binary_run, [tmp_path / "x.img"]).probs[0]  # load_image, as on disk
    response = client.post("/v1/predict?top_k=2", files={"file": ("x", data)})
    assert response.status_code == 200, response.text
    got = {p["class"]: p["probability"] for p in response.json()["results"][0]["top_k"]}
    np.testing.assert_allclose([got["normal"], got["pneumonia"]], expected, atol=1e-6)


def bomb() -> bytes:
    """A 9000 x 9000 one-bit PNG: about 10 kB on the wire, 81 million pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_a_json_error_and_never_stop_the_server(client):
    good = png_bytes()
    cases = [
        (415, "not an image format", {"files": {"file": ("notes.txt", b"just some text, not pixels")}}),
        (422, "cannot decode", {"files": {"file": ("cut.png", good[: len(good) // 2])}}),
        (422, "empty", {"files": {"file": ("empty.png", b"")}}),
        (413, "decompression bomb", {"files": {"file": ("bomb.png", bomb())}}),
        (413, "too many files: at most 16", {"files": [("file", (f"{i}.png", good)) for i in range(17)]}),
        (415, "send the images as multipart/form-data", {"data": {"note": "no file"}}),  # urlencoded
        (422, "part 'image' is a file: send each image as a file part named 'file'",  # never dropped in silence
         {"files": [("file", ("a.png", good)), ("image", ("b.png", good))]}),
        (422, "part 'file' is a text field", {"files": [("file", ("a.png", good))], "data": {"file": "hello"}}),
        (415, "multipart/form-data parts named 'file'", {"content": b"{}", "headers": {"content-type": "x/json"}}),
    ]
    for status, fragment, kwargs in cases:
        response = client.post("/v1/predict", **kwargs)
        assert response.status_code == status and fragment in response.json()["error"], (status, response.text)
    for query in ("top_k=0", "top_k=3", "top_k=two", "explain=maybe", "topk=1", "threshold=0.9&tta=flip"):
        response = client.post(f"/v1/predict?{query}", files={"file": ("a.png", good)})
        assert response.status_code == 422 and "error" in response.json(), query
    unknown = client.post("/v1/predict?topk=1&tta=flip", files={"file": ("a.png", good)}).json()["error"]
    assert "unknown query parameter(s) topk, tta: /v1/predict takes top_k and explain" in unknown
    twice = client.post("/v1/predict?top_k=1&explain=true&explain=false", files={"file": ("a.png", good)})
    assert twice.status_code == 422 and "explain given more than once" in twice.json()["error"]  # the last won
    assert client.get("/v1/predict").status_code == 405 and "error" in client.get("/v1/predict").json()
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
    assert client.get("/healthz").status_code == 200  # still up, and still answering
    assert client.post("/v1/predict", files={"file": ("a.png", good)}).status_code == 200


def test_a_body_over_the_upload_limit_is_refused_by_its_length(binary_run):
    with client_for(binary_run, max_upload_mb=0.05) as client:
        response = client.post("/v1/predict", files={"file": ("big.png", os.urandom(80_000))})
        assert response.status_code == 413 and "over the server's limit of 0.05 MB" in response.json()["error"]
        assert client.post("/v1/predict", files={"file": ("a.png", png_bytes())}).status_code == 200


def test_a_streamed_body_is_cut_off_at_the_limit_not_read_whole(binary_run):
    """Drives the ASGI app directly with a body that never ends and no Content-Length (chunked upload)."""
    limit = 64 * 1024
    service = Service(binary_run)
    service.load()
    app = create_app(service, ServeOptions(max_upload_mb=limit / 2**20))
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    chunks, sent = [0], []

    async def receive():
        chunks[0] += 1
        if chunks[0] > 10_000:  # bounded even if the cap failed
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": head if chunks[0] == 1 else b"x" * 4096, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=B")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert (chunks[0] - 1) * 4096 <= limit + 4096  # stopped at the first chunk over the cap


def test_a_token_guards_every_endpoint_but_the_health_checks(binary_run):
    with client_for(binary_run, token=TOKEN) as client:
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        for method, path in (("GET", "/v1/model"), ("GET", "/"), ("POST", "/v1/predict")):
            assert client.request(method, path).status_code == 401
            wrong = client.request(method, path, headers={"Authorization": "Bearer wrong-token"})
            assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/v1/model", headers=right).status_code == 200
        assert client.post("/v1/predict", headers=right, files={"file": ("a.png", png_bytes())}).status_code == 200
    assert "without --token" in exposure_warning(ServeOptions(host="0.0.0.0"))
    assert exposure_warning(ServeOptions(host="0.0.0.0", token=TOKEN)) is None
    assert exposure_warning(ServeOptions(host="127.0.0.1")) is None
    assert exposure_warning(ServeOptions(host="::1")) is None


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_one_log_line_per_request_without_the_image(client):
    logger, collect = logging.getLogger("imgclf.serve"), Collect()
    logger.addHandler(collect)
    level = logger.level
    logger.setLevel(logging.INFO)  # whatever an earlier test left the imgclf logger at
    try:
        client.post("/v1/predict", files={"file": ("secret-scan.png", png_bytes())})
        client.get("/nowhere")
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    lines = collect.lines
    assert re.fullmatch(r"POST /v1/predict 200 [\d.]+ ms in=\d+B out=\d+B", lines[0]), lines
    assert re.fullmatch(r"GET /nowhere 404 [\d.]+ ms in=0B out=\d+B", lines[1]), lines
    assert len(lines) == 2 and not any("secret-scan" in line for line in lines)


def test_the_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", page.text)  # nothing from the network
    assert 'id="drop"' in page.text and "v1/predict" in page.text and "normal, pneumonia" in page.text


def test_class_names_that_look_like_the_page_s_placeholders_are_shown_as_they_are():
    """They were filled in by a later placeholder: a class __EXPLAIN__ showed as 'checked'."""
    page = render_page("t", ["bird", "__EXPLAIN__", "</script>"], 4, 2**20, 2, explain=True)
    assert "3 classes: bird, __EXPLAIN__, &lt;/script&gt;" in page


@pytest.fixture(scope="module")
def live_server(binary_run):
    """A real uvicorn on a free port of 127.0.0.1 (1 MB upload limit), stopped in the finally."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = listening_socket("127.0.0.1", 0)
    app = create_app(Service(binary_run), ServeOptions(max_upload_mb=1))
    server = uvicorn.Server(server_config(app))  # serve's own settings
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            wait_until_ready(http.get)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def test_twenty_concurrent_requests_against_uvicorn(live_server, binary_run):
    paths = files_of(binary_run, 20)
    expected = predict_with_onnx(binary_run, paths)

    async def send_all():
        async with httpx.AsyncClient(base_url=live_server, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/predict", files={"file": (p.name, p.read_bytes())})
                                          for p in paths))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 20
    labels = [r.json()["results"][0]["label"] for r in responses]
    assert labels == [binary_run.classes[i] for i in expected.pred]


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed the connection: an orderly end (b""), or a reset, which the kernel sends instead when it
    closes a socket whose unread request bytes are still queued (CI saw that). A timeout raises: not closed."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_a_client_whose_headers_never_end_is_dropped_and_others_are_served(live_server, monkeypatch):
    """Slowloris: a connection that never finished its headers was held for ever (256 of them and every
    client got 503). Now the server closes it after HEADER_TIMEOUT; a prompt client on a kept-alive
    connection is served, then gets the same deadline for its next request."""
    monkeypatch.setattr("imgclf.serving.connections.HEADER_TIMEOUT", 0.5)
    port = int(live_server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as prompt:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        prompt.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        for _ in range(100):  # bounded: the head and the body may come in separate segments
            answer += prompt.recv(4096)
            if answer.endswith(b'{"status":"alive"}'):
                break
        assert answer.startswith(b"HTTP/1.1 200")
        assert closed_by_server(slow)  # within the deadline, not by the 10 s timeout
        prompt.sendall(b"GET /healthz HTTP/1.1\r\n")  # its next request dawdles the same way
        assert closed_by_server(prompt)
    with httpx.Client(base_url=live_server, timeout=10) as http:
        assert http.get("/healthz").status_code == 200


@pytest.mark.slow
def test_sigterm_stops_the_server_gracefully(binary_run):
    """A real ``imgclf serve`` on a free port of 127.0.0.1: ready, SIGTERM, the lifespan's "stopped" line, exit 0."""
    process = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", str(binary_run.path), "--port", "0"],
                               stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url = None
        for _ in range(600):  # bounded: 60 s for start-up
            with contextlib.suppress(queue.Empty):
                match = re.search(r"on (http://127\.0\.0\.1:\d+)", lines.get(timeout=0.1))
                url = url or (match and match.group(1))
            if url:
                break
        assert url, "the server never said where it listens"
        with httpx.Client(base_url=url, timeout=10) as http:
            wait_until_ready(http.get, 60)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        log = _drain(lines)
        assert code == 0, log
        assert "imgclf serve: stopped; requests in flight were finished" in log and "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _drain(lines: queue.Queue) -> str:
    text = []
    with contextlib.suppress(queue.Empty):
        while True:
            text.append(lines.get(timeout=2))
    return "".join(text)


@pytest.mark.slow
def test_serve_refuses_in_one_line_before_it_listens(binary_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(binary_run.path, copy, ignore=shutil.ignore_patterns("export"))
    assert_clean_error(imgclf_cli("serve", copy, "--engine", "onnx", "--port", "0", timeout=120), "has no export")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_clean_error(imgclf_cli("serve", copy, "--port", port, timeout=120), f"cannot listen on 127.0.0.1:{port}")


def test_the_page_classifies_a_dropped_image_in_chromium(live_server, binary_run, tmp_path):
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        if os.environ.get("IMGCLF_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    image = files_of(binary_run, 1)[0]
    expected = binary_run.classes[predict_with_onnx(binary_run, [image]).pred[0]]
    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(live_server + "/")
            _drop(page, image.name, image.read_bytes())
            page.wait_for_selector(".card .label", timeout=10_000)
            assert page.inner_text(".card .label") == expected
            assert page.locator(".card img[alt^='preview of']").count() == 1  # the dropped image itself
            assert page.locator(".card .bar").count() == 2  # top-k bars (k = 2 classes)
            assert page.locator(".card img.gradcam").get_attribute("src").startswith("data:image/png;base64,")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            _drop(page, "huge.png", os.urandom(1_500_000))  # over the server's 1 MB
            page.wait_for_selector("#error", state="visible", timeout=10_000)
            assert "over the server's limit of 1 MB" in page.inner_text("#error")
        finally:
            browser.close()
    assert problems == []
    assert all(url.startswith((live_server, "blob:", "data:")) for url in requests), requests


def _drop(page, name: str, data: bytes) -> None:
    """A real drop event on the drop zone, carrying ``data`` as a File in a DataTransfer."""
    transfer = page.evaluate_handle(
        """([b64, name]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
           const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: "image/png"})); return dt; }""",
        [base64.b64encode(data).decode(), name])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})



def test_a_dicom_upload_over_the_pixel_cap_is_refused_on_its_header_before_decoding(tmp_path):
    pytest.importorskip("pydicom")
    from imgclf.serving.graph import InputSpec
    from imgclf.serving.uploads import UploadError, decode_upload

    from imagefactory import write_dicom

    spec, folder = InputSpec(8, 1, "bilinear"), tmp_path / "uploads"
    folder.mkdir()
    # 9000 x 9000 in the header and 32 bytes of pixels: a decode would be a 422 about the pixel data
    data = write_dicom(tmp_path / "bomb.dcm", np.zeros((4, 4)), claimed_size=(9000, 9000)).read_bytes()
    with pytest.raises(UploadError) as refused:
        decode_upload(data, "bomb.dcm", spec, folder, max_pixels=50_000_000)
    assert refused.value.status == 413 and "9000x9000 is 81,000,000 pixels" in str(refused.value)
    small = write_dicom(tmp_path / "ok.dcm", np.arange(64).reshape(8, 8) * 50).read_bytes()
    array, _ = decode_upload(small, "ok.dcm", spec, folder, max_pixels=50_000_000)
    assert array.shape == (8, 8, 1) and array[0, 0, 0] < array[-1, -1, 0]
    with pytest.raises(UploadError) as refused:
        decode_upload(b"not a DICOM file", "notes.dcm", spec, folder, max_pixels=50_000_000)
    assert refused.value.status == 422 and "not a readable DICOM file" in str(refused.value)


@pytest.mark.parametrize("size", [float("nan"), float("inf"), 0.0, -1.0, 5000.0])
def test_an_upload_limit_that_is_no_size_is_refused(size):
    with pytest.raises(ConfigError, match="--max-upload-mb"):
        ServeOptions(max_upload_mb=size).check()
    ServeOptions(max_upload_mb=4096).check()


# -- a hostile client (an audit of the server) ------------------------------------------------------------------

def tiff_bytes(mode: str, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.float32 if mode == "F" else np.uint8), mode).save(buffer, "TIFF")
    return buffer.getvalue()


def test_wide_samples_count_against_the_pixel_limit_by_their_decode_cost(binary_run):
    """A 7000 x 7000 float TIFF (297 kB) within --max-pixels took 1.6 GB and 3.8 s to decode, and two requests of
    16 such files held both decode slots for 23 s: 32-bit samples now count 6 pixels each."""
    with client_for(binary_run, max_pixels=10_000) as client:
        wide = client.post("/v1/predict", files={"file": ("f.tif", tiff_bytes("F", 60))})  # 3,600 pixels
        plain = client.post("/v1/predict", files={"file": ("l.tif", tiff_bytes("L", 60))})
    assert wide.status_code == 413 and "F samples cost 6x an 8-bit pixel" in wide.json()["error"]
    assert plain.status_code == 200


def test_what_no_check_foresaw_is_json_and_one_log_line(client, monkeypatch):
    def header_fails(_path):
        raise NotImplementedError("Unimplemented pixel format 0")  # a DDS file made Pillow raise this

    monkeypatch.setattr("imgclf.serving.uploads.header", header_fails)
    refused = client.post("/v1/predict", files={"file": ("x.dds", b"DDS " + bytes(124))})
    assert refused.status_code == 422 and "Unimplemented pixel format" in refused.json()["error"]
    monkeypatch.setattr(Service, "answer", lambda *a: 1 / 0)
    failed = client.post("/v1/predict", files={"file": ("a.png", png_bytes())})
    assert failed.status_code == 500 and "ZeroDivisionError" in failed.json()["error"]  # JSON, not text/plain


def asgi_post(app, messages, headers=((b"content-type", b"multipart/form-data; boundary=XyZ"),)):
    """Drive ``app`` with a POST /v1/predict whose body arrives as ``messages`` (then never more); the response."""
    sent, feed = [], iter(messages)

    async def receive():
        message = next(feed, None)
        if message is None:
            await asyncio.sleep(3600)  # a client that stops sending
        return message

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8000"), *headers], "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": ""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_client_that_leaves_or_stalls_mid_body_is_a_4xx_line_not_a_traceback(client, monkeypatch):
    part = {"type": "http.request", "body": b"--XyZ\r\n", "more_body": True}
    status, body = asgi_post(client.app, [part, {"type": "http.disconnect"}])
    assert status == 400 and b"disconnected before its body ended" in body  # was a 500 and 70 lines of traceback
    monkeypatch.setattr("imgclf.serving.middleware.BODY_TIMEOUT", 0.2)
    status, body = asgi_post(client.app, [part])  # one part, then silence: a slow client held it for ever
    assert status == 408 and b"stopped arriving" in body


def test_head_a_lowercase_bearer_and_a_foreign_host(binary_run):
    with client_for(binary_run, token=TOKEN) as client:
        assert client.head("/healthz").status_code == 200  # uptime probes send HEAD (405 before)
        lower = client.get("/v1/model", headers={"authorization": f"bearer {TOKEN}"})
        assert lower.status_code == 200  # the scheme is case-insensitive (RFC 9110)
    service = Service(binary_run)
    from starlette.testclient import TestClient

    with TestClient(create_app(service, ServeOptions(), check_host=True), base_url="http://127.0.0.1:8000") as local:
        wait_until_ready(local.get)
        assert local.get("/healthz").status_code == 200
        rebound = local.get("/healthz", headers={"host": "evil.example.com"})  # DNS rebinding onto 127.0.0.1
        assert rebound.status_code == 421 and "not this machine" in rebound.json()["error"]
        assert local.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
