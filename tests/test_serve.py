"""serve.py as a user runs it: a real uvicorn server on a free port, started and stopped here, on
the tiny run's best.pth. Its answers are predict.py's; concurrent clients are batched; bad input
is a 4xx JSON and the server goes on; a token guards it; SIGTERM answers what is in flight and
exits 0; the page works in a real headless Chromium."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, run_in_process, run_script, write_bomb_png, write_truncated_jpeg

TOKEN = "a-test-token-that-is-long-enough"
SERVE = os.path.join(ROOT, "serve.py")


class Server:
    """serve.py in its own process, its output in files under `folder`; stopped by stop()."""

    def __init__(self, folder, weights, *flags):
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, SERVE, "--weights", str(weights), "--port", "0",
                                          "--device", "cpu", *flags], stdout=out, stderr=err,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + 60
        while not (address := re.search(r"at http://([\d.]+):(\d+)/", self.out.read_text())):
            assert self.proc.poll() is None and time.time() < deadline, self.log()
            time.sleep(0.05)
        self.host, self.port = address[1], int(address[2])

    def log(self):
        return self.out.read_text() + self.err.read_text()

    def request(self, method, path, body=None, headers=None, token=TOKEN):
        """(status, headers, the JSON answer) of one request on a new connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body, dict({"Authorization": f"Bearer {token}"} if token else {},
                                                  **(headers or {})))
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
        finally:
            conn.close()

    def predict(self, data, content_type="image/png", query="", **kwargs):
        return self.request("POST", "/predict" + query, data, {"Content-Type": content_type}, **kwargs)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def multipart(files, field="file"):
    """(body, Content-Type) of a multipart/form-data request with `files` [(name, bytes)]."""
    boundary = "serve-test-boundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def images_of(data):
    """Two images of each class of the tiny run's data folder, sorted."""
    return sorted(os.path.join(data, c, name) for c in os.listdir(data)
                  for name in sorted(os.listdir(os.path.join(data, c)))[:2])


def predict_json(paths, weights, *flags):
    """predict.py --json on each image alone (batches of 1): {path: its JSON object}."""
    script = os.path.join(ROOT, "predict.py")
    result = run_in_process([sys.executable, script, *paths, "--weights", str(weights), "--json", "--device", "cpu",
                             "--batch-size", "1", *flags], 120)
    assert result.returncode == 0, result.stderr
    return {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """One server for the module: the tiny run's best.pth, a token, a 0.1 MB upload limit."""
    _, run, _ = tiny_run
    started = Server(tmp_path_factory.mktemp("serve"), run / "best.pth", "--token", TOKEN, "--max-upload-mb", "0.1")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def expected(tiny_run):
    """predict.py's answers with --topk 3 for the images the tests send."""
    data, run, _ = tiny_run
    return predict_json(images_of(data), run / "best.pth", "--topk", "3")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_answers_are_predict_pys_for_the_same_files(server, tiny_run, expected):
    """The same fields and numbers as predict.py --json: a raw body, and several files in one form."""
    data, _, _ = tiny_run
    for path, want in expected.items():
        status, _, answer = server.predict(read(path), query="?topk=3")
        assert status == 200 and answer == {"topk": want["topk"]}, (path, answer, want)
    paths = images_of(data)[:3]
    body, content_type = multipart([(os.path.basename(p), read(p)) for p in paths])
    status, headers, answer = server.predict(body, content_type, "?topk=2")
    assert status == 200, answer
    assert [r["file"] for r in answer["results"]] == [os.path.basename(p) for p in paths]
    for r, path in zip(answer["results"], paths):  # a batch of 3: the same classes, probabilities to fp32 noise
        assert [t["index"] for t in r["topk"]] == [t["index"] for t in expected[path]["topk"][:2]]
        assert [t["prob"] for t in r["topk"]] == pytest.approx([t["prob"] for t in expected[path]["topk"][:2]],
                                                               abs=1e-5)


def test_concurrent_clients_are_answered_in_batches(server, expected):
    """32 requests from 8 threads: each gets its own image's answer, and the model saw batches of
    more than one image."""
    paths = list(expected) * 6
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda path: server.predict(read(path), query="?topk=3"), paths[:32]))
    for path, (status, _, answer) in zip(paths, replies):
        assert status == 200, answer
        assert [t["index"] for t in answer["topk"]] == [t["index"] for t in expected[path]["topk"]]
        assert [t["prob"] for t in answer["topk"]] == pytest.approx([t["prob"] for t in expected[path]["topk"]],
                                                                    abs=1e-5)
    assert max(int(headers["x-batch-size"]) for _, headers, _ in replies) > 1


def too_large_declared(server):
    """A request whose Content-Length is over the limit, its body never sent: refused from the header."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: image/png\r\nContent-Length: 50000000\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def too_large_streamed(server):
    """A chunked body (no Content-Length) that grows past the limit."""
    def chunks():
        for _ in range(15):
            yield b"\0" * 10_000
    return server.request("POST", "/predict", chunks(), {"Content-Type": "image/png"})[::2]


BAD_INPUTS = {  # name: (request, status, a word of the error)
    "not an image": (lambda s, tmp: s.predict(b"hello, not an image")[::2], 400, "not an image"),
    "truncated image": (lambda s, tmp: s.predict(read(write_truncated_jpeg(tmp / "t.jpg")), content_type="image/jpeg")
                        [::2], 400, "truncated"),
    "too many pixels": (lambda s, tmp: s.predict(read(write_bomb_png(tmp / "bomb.png")))[::2], 413, "too many pixels"),
    "empty body": (lambda s, tmp: s.predict(b"")[::2], 400, "empty"),
    "wrong field name": (lambda s, tmp: s.predict(*multipart([("a.png", b"x")], field="image"))[::2], 400,
                         "no form field named file"),
    "topk 0": (lambda s, tmp: s.predict(b"x", query="?topk=0")[::2], 400, "topk=0"),
    "topk past the classes": (lambda s, tmp: s.predict(b"x", query="?topk=4")[::2], 400, "from 1 to 3"),
    "topk not a number": (lambda s, tmp: s.predict(b"x", query="?topk=two")[::2], 400, "topk=two"),
    "body declared too large": (lambda s, tmp: too_large_declared(s), 413, "--max-upload-mb"),
    "body streamed too large": (lambda s, tmp: too_large_streamed(s), 413, "--max-upload-mb"),
    "no such page": (lambda s, tmp: s.request("GET", "/weights/best.pth")[::2], 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_json_error_and_the_server_goes_on(server, tmp_path, case):
    send, status, word = BAD_INPUTS[case]
    got, answer = send(server, tmp_path)
    assert got == status and set(answer) == {"error"} and word in answer["error"], answer
    assert "Traceback" not in answer["error"]
    assert server.request("GET", "/health", token=None)[::2] == (200, {"status": "ok", "requests": 0})
    if status != 404:  # the log names the request that was refused
        assert "POST /predict from 127.0.0.1:" in server.err.read_text()


def test_the_token_is_required_for_predict_and_info(server, tiny_run):
    """Without the token or with a wrong one: 401 and no answer; /health and the page stay open."""
    photo = read(images_of(tiny_run[0])[0])
    for token in (None, "wrong", TOKEN[:-1]):
        status, headers, answer = server.predict(photo, token=token)
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "token" in answer["error"]
        assert server.request("GET", "/info", token=token)[0] == 401
    status, _, info = server.request("GET", "/info")
    assert status == 200 and info["classes"] == ["0", "1", "2"] and info["image_size"] == 32
    assert info["model"] == "b0" and info["device"] == "cpu" and len(info["sha256"]) == 64
    assert server.request("GET", "/health", token=None)[0] == 200


def run_serve(*args, timeout=60):
    """serve.py ARGS in this process (torch is imported already): its exit code and output."""
    return run_in_process([sys.executable, SERVE, *map(str, args)], timeout)


def user_error(result, *words):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(word in line for word in words), line


def test_a_host_that_other_machines_reach_needs_a_token(tiny_run, monkeypatch):
    monkeypatch.delenv("SERVE_TOKEN", raising=False)
    weights = tiny_run[1] / "best.pth"
    user_error(run_serve("--weights", weights, "--host", "0.0.0.0"), "--host 0.0.0.0", "--token", "SERVE_TOKEN")


def test_mistakes_on_the_command_line_are_one_line(tiny_run, tmp_path):
    """A port in use, a missing weights file, bad flag values: exit 2 and a line naming the flag."""
    weights = tiny_run[1] / "best.pth"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        user_error(run_serve("--weights", weights, "--port", taken.getsockname()[1]), "--port", "in use", "--port 0")
    user_error(run_serve("--weights", tmp_path / "missing.pth", "--port", "0"), "missing.pth")
    user_error(run_serve("--weights", weights, "--max-batch", "0"), "--max-batch")
    user_error(run_serve("--weights", weights, "--max-upload-mb", "0"), "--max-upload-mb")
    user_error(run_serve("--port", "0"), "--weights is required")


def test_without_fastapi_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: importing it raises ImportError
    result = run_serve("--weights", "x.pth")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: serve.py needs fastapi, uvicorn and python-multipart: pip install -r requirements-serve.txt")


def test_a_full_queue_answers_503_and_sigterm_answers_the_requests_in_flight(tiny_run, tmp_path, expected):
    """--max-queue 2: a slow upload and a request waiting for it fill the server, a third gets 503
    with Retry-After. Then SIGTERM: no new connection is taken, both requests in flight are
    answered (in one batch), and the server exits 0."""
    data, run, _ = tiny_run
    path = images_of(data)[0]
    photo = read(path)
    server = Server(tmp_path, run / "best.pth", "--max-queue", "2", "--max-wait-ms", "20000")
    try:
        slow = socket.create_connection((server.host, server.port), timeout=30)
        slow.sendall(f"POST /predict?topk=3 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(photo)}\r\n\r\n".encode() + photo[:10])
        wait_for_requests(server, 1)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.predict, photo, query="?topk=3", token=None)
            wait_for_requests(server, 2)
            status, headers, answer = server.predict(photo, token=None)
            assert status == 503 and headers["retry-after"] == "1" and "busy" in answer["error"]
            server.proc.send_signal(signal.SIGTERM)
            wait_for_no_new_connections(server)
            slow.sendall(photo[10:])
            response = http.client.HTTPResponse(slow)
            response.begin()
            assert response.status == 200 and json.loads(response.read()) == {"topk": expected[path]["topk"]}
            status, headers, answer = waiting.result(30)
            assert status == 200
            assert [t["index"] for t in answer["topk"]] == [t["index"] for t in expected[path]["topk"]]
            assert headers["x-batch-size"] == "2"
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def wait_for_requests(server, n):
    """Until the server says `n` requests are inside it."""
    deadline = time.time() + 30
    while server.request("GET", "/health", token=None)[2]["requests"] < n:
        assert time.time() < deadline, server.log()
        time.sleep(0.02)


def wait_for_no_new_connections(server):
    """Until the stopping server refuses a new connection."""
    deadline = time.time() + 30
    while True:
        try:
            server.request("GET", "/health", token=None)
        except OSError:
            return
        assert time.time() < deadline, server.log()
        time.sleep(0.05)


def browser(tmp_path):
    """Headless Chromium from the system's packages, driven by selenium; a skip where either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -r requirements-dev.txt for selenium")
    from selenium.webdriver.chrome.service import Service
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no Chromium or chromedriver here: apt-get install chromium chromium-driver for the page test")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_shows_the_top_class_of_an_uploaded_image(server, tmp_path, tiny_run, expected):
    """In a real browser: the page loads (the token from its #token= address), a file chosen in its
    file input is sent, its top-1 class is shown, and the console has no error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    path = images_of(tiny_run[0])[-1]
    driver = browser(tmp_path / "profile")
    try:
        driver.get(f"http://{server.host}:{server.port}/#token={TOKEN}")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "about").text.startswith("3 classes, 32 px"))
        assert "token" not in driver.current_url  # out of the address bar once read
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(path)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#classes li"))
        top = expected[path]["topk"][0]
        rows = driver.find_elements(By.CSS_SELECTOR, "#classes li")
        assert rows[0].find_element(By.CLASS_NAME, "name").text == top["class"]
        assert rows[0].find_element(By.CLASS_NAME, "prob").text == f"{top['prob']:.3f}"
        driver.find_element(By.ID, "cam").click()  # the Grad-CAM of the same image
        wait.until(lambda d: (d.find_element(By.ID, "cam-picture").get_attribute("src") or "").startswith("data:"))
        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


# a row of benchmark.py's table (tests/test_performance.py's ROW, with the latencies' ms)
ROW = re.compile(r"^(.+?)\s+([\d.]+|-)\s+([\d.]+|-)\s+(img/s|MiB|ms|s)\s+(?:([\d.]+)x|-)$", re.M)


def test_benchmark_serve_measures_both_servers_and_predict_py(tmp_path, monkeypatch):
    """benchmark.py --serve at a toy size: both servers start, every pass is answered, and each row
    has positive figures and their ratio."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    out = run_script("benchmark.py", "--serve", "--img-size", "32", "--images", "8", "--rounds", "1",
                     timeout=300).stdout
    rows = ROW.findall(out)
    assert [name.strip() for name, *_ in rows] == [
        "1 client: batched vs --max-batch 1", "8 clients: batched vs --max-batch 1",
        "8 clients: batched server vs predict.py over the folder",
        "1 client p50 latency vs predict.py's time per image",
        "1 client p50 latency: batched vs --max-batch 1", "1 client p95 latency: batched vs --max-batch 1",
        "8 clients p50 latency: batched vs --max-batch 1", "8 clients p95 latency: batched vs --max-batch 1"], out
    for _, base, ours, unit, ratio in rows:
        assert float(base) > 0 and float(ours) > 0 and unit in ("img/s", "ms"), out
        assert float(ratio) == pytest.approx(float(ours) / float(base), rel=0.05), out
