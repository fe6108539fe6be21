"""--weights imagenet: names, torch's hub cache, the download (checked, whole or nothing, once under
torchrun) and the scripts on it. No internet: a web server on 127.0.0.1 that each test starts and
stops plays download.pytorch.org, and TORCH_HOME is the test's own folder."""
import base64
import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import matplotlib
import pytest
import torch
import torchvision
from PIL import Image

import pretrained
from errors import WeightsError
from conftest import FAST, ROOT, TRAIN_MAIN_UNDER_TORCHRUN, copy_digits, run_script

PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
B0 = pretrained.FILES["b0"]


class Server:
    """A web server on 127.0.0.1 (a free port) for the length of a `with`. It serves `files`
    ({name: bytes}) and counts the requests and the bytes sent; `mode` misbehaves on purpose: "500",
    "truncate" (sends half of what Content-Length promised, then closes), "together" (holds every
    answer until two requests are in, so two downloads overlap), "endless" (no Content-Length, and
    the file over and over until the client hangs up), "huge" (a Content-Length of 10 GB),
    "bad-length" (a Content-Length that is not a number). `delay`: seconds between 64 KiB blocks.
    `auth`: the Authorization header a request must carry (else 401)."""

    def __init__(self, files, mode="ok", delay=0.0, auth=None):
        self.files, self.mode, self.delay, self.auth, self.requests, self.sent = files, mode, delay, auth, 0, 0
        self.two_in = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a client that stops reading cannot hold a thread for longer

            def do_GET(self):
                outer.requests += 1
                if outer.requests >= 2:
                    outer.two_in.set()
                body = outer.files.get(self.path.lstrip("/"))
                if outer.auth and self.headers.get("Authorization") != outer.auth:
                    self.send_error(401)
                    return
                if body is None or outer.mode == "500":
                    self.send_error(404 if body is None else 500)
                    return
                if outer.mode == "together":
                    outer.two_in.wait(10)
                self.send_response(200)
                length = {"endless": None, "huge": str(10**10), "bad-length": "abc"}.get(outer.mode, str(len(body)))
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                sent = body[:len(body) // 2] if outer.mode == "truncate" else body
                for _ in range(1000 if outer.mode == "endless" else 1):  # at most 1000 copies: the test ends
                    for i in range(0, len(sent), 1 << 16):
                        try:
                            self.wfile.write(sent[i:i + (1 << 16)])
                        except OSError:  # the client hung up
                            return
                        outer.sent += len(sent[i:i + (1 << 16)])
                        threading.Event().wait(outer.delay)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models/"  # a trailing slash, stripped

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.two_in.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def dead_url():
    """A URL on a port of 127.0.0.1 where nothing listens: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/models"


def named(content, stem="efficientnet_b0_test"):
    """A file name that carries the start of its content's sha256, as torchvision's do."""
    return f"{stem}-{hashlib.sha256(content).hexdigest()[:8]}.pth"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """TORCH_HOME in the test's folder, no proxy for 127.0.0.1, short timeouts; the hub cache folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(pretrained, "TIMEOUT", 5)
    return tmp_path / "torch" / "hub" / "checkpoints"


def saved(tensor):
    """The bytes torch.save writes for {"w": tensor}: a real .pth (a zip archive)."""
    buffer = io.BytesIO()
    torch.save({"w": tensor}, buffer)
    return buffer.getvalue()


@pytest.fixture
def payload(monkeypatch):
    """A 300 KB .pth as the b0 file, under a name that carries its hash (the official names carry
    the official files' hashes)."""
    content = saved(torch.randn(75_000, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setitem(pretrained.FILES, "b0", named(content))
    return content


def listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_download_then_reuse_offline(cache, payload, monkeypatch, capsys):
    """The first use downloads into torch's cache, with a progress line now and then in a log; the
    second is served from the cache with the server gone."""
    monkeypatch.setattr(pretrained, "LOG_INTERVAL", 0.0)  # a line for every block
    name = pretrained.FILES["b0"]
    with Server({f"models/{name}": payload}) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        path = pretrained.resolve("imagenet", "b0")
    assert server.requests == 1
    assert path == str(cache / name) and open(path, "rb").read() == payload
    assert listing(cache) == [name]  # no temporary file left
    log = capsys.readouterr().err.splitlines()
    assert log[0] == f"downloading {server.url.rstrip('/')}/{name} to {path} (0.3 MB)"
    assert "0.3 MB (100%)" in log[-2] and log[-1].startswith(f"downloaded {name} (0.3 MB in")

    monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", dead_url())
    assert pretrained.resolve("IMAGENET1K_V1", None) == path  # offline: the cache is enough
    assert capsys.readouterr().err == ""


def test_names(cache, tmp_path, monkeypatch):
    """torchvision's spellings, a variant in the name against --model, DEFAULT meaning V1 for b1,
    V2 and unknown names refused in one line; paths pass through. All from the cache, offline."""
    monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", dead_url())
    cache.mkdir(parents=True)
    for name in pretrained.FILES.values():
        (cache / name).write_bytes(saved(torch.zeros(1)))  # used as it is: not hashed again
    files = pretrained.FILES
    for spelling in ("imagenet", "ImageNet", "IMAGENET1K_V1", "DEFAULT", "EfficientNet_B0_Weights.IMAGENET1K_V1"):
        assert pretrained.resolve(spelling, "b0") == str(cache / files["b0"])
    assert pretrained.resolve("imagenet", None) == str(cache / files["b0"])  # no --model: b0
    assert pretrained.resolve("imagenet", "b4") == str(cache / files["b4"])
    assert pretrained.resolve("EfficientNet_B3_Weights.IMAGENET1K_V1", None) == str(cache / files["b3"])
    assert pretrained.resolve("EfficientNet_B1_Weights.DEFAULT", "b1") == str(cache / files["b1"])  # V1
    assert pretrained.resolve("imagenet", "v2_l") == str(cache / files["v2_l"])
    assert pretrained.resolve("EfficientNet_V2_S_Weights.IMAGENET1K_V1", None) == str(cache / files["v2_s"])
    assert pretrained.resolve("efficientnet_v2_m_weights.default", "v2_m") == str(cache / files["v2_m"])
    with pytest.raises(WeightsError, match="are EfficientNetV2-S weights but --model is b4: use --model v2_s"):
        pretrained.resolve("EfficientNet_V2_S_Weights.IMAGENET1K_V1", "b4")
    assert files["b1"] == "efficientnet_b1_rwightman-bac287d4.pth"
    with pytest.raises(WeightsError, match="are EfficientNet-B3 weights but --model is b0: use --model b3"):
        pretrained.resolve("EfficientNet_B3_Weights.IMAGENET1K_V1", "b0")
    with pytest.raises(WeightsError, match="IMAGENET1K_V2 .* use --weights imagenet"):
        pretrained.resolve("EfficientNet_B1_Weights.IMAGENET1K_V2", "b1")
    with pytest.raises(WeightsError) as unknown:
        pretrained.resolve("imagenet21k", "b0")
    assert "imagenet21k" in str(unknown.value) and pretrained.NAMES in str(unknown.value)
    assert "\n" not in str(unknown.value)
    own = tmp_path / "mine.pth"
    own.write_bytes(b"x")
    assert pretrained.resolve(str(own), "b0") == str(own) and pretrained.resolve(None, "b0") is None


def test_a_missing_torchvision_file_points_to_the_download_by_name(tmp_path):
    with pytest.raises(WeightsError, match="--weights imagenet --model b3 downloads it"):
        pretrained.resolve(str(tmp_path / "efficientnet_b3_rwightman-b3899882.pth"), "b0")
    with pytest.raises(WeightsError, match="check the --weights path"):
        pretrained.resolve(str(tmp_path / "mine.pth"), "b0")


def test_two_downloads_at_once(cache, payload, monkeypatch):
    """Two downloads that overlap (the server answers neither until both asked) each land a whole
    file: the cache holds the right bytes and nothing else."""
    name = pretrained.FILES["b0"]
    results, failures = [], []

    def use():
        try:
            results.append(pretrained.resolve("imagenet", "b0"))
        except Exception as e:  # reported by the assertion below
            failures.append(e)

    with Server({f"models/{name}": payload}, mode="together", delay=0.01) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        threads = [threading.Thread(target=use) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not failures and results == [str(cache / name)] * 2
    assert server.requests == 2 and server.two_in.is_set()
    assert listing(cache) == [name] and (cache / name).read_bytes() == payload


def one_line_error(call):
    with pytest.raises(WeightsError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("mode", ["404", "500", "unreachable"])
def test_server_errors_name_the_url_and_the_cache(cache, payload, monkeypatch, mode):
    """Nothing to download: one line with the URL tried, where to put the file by hand, or
    --weights PATH; nothing in the cache."""
    name = pretrained.FILES["b0"]
    with Server({} if mode == "404" else {f"models/{name}": payload}, mode=mode) as server:
        url = dead_url() if mode == "unreachable" else server.url
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", url)
        message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    assert f"cannot download {url.rstrip('/')}/{name}" in message
    assert {"404": "HTTP 404", "500": "HTTP 500", "unreachable": "Connection refused"}[mode] in message
    assert str(cache / name) in message and "--weights PATH" in message
    assert listing(cache) == []


def test_wrong_hash_is_refused_and_not_kept(cache, payload, monkeypatch):
    name = pretrained.FILES["b0"]
    with Server({f"models/{name}": payload[::-1]}) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    expected = name.rsplit("-", 1)[1][:8]
    assert f"sha256 starts {hashlib.sha256(payload[::-1]).hexdigest()[:8]}, not {expected}" in message
    assert "nothing was kept" in message and listing(cache) == []


def test_interrupted_download_leaves_nothing(cache, payload, monkeypatch):
    """The server closes the connection half-way: the missing bytes are noticed (Content-Length),
    and neither the file nor a partial one stays."""
    name = pretrained.FILES["b0"]
    with Server({f"models/{name}": payload}, mode="truncate") as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    assert f"broke off after {len(payload) // 2:,} of {len(payload):,} bytes" in message and listing(cache) == []


def torchvision_net(name="b0", sharpen=300):
    """torchvision's `name` with random weights, BatchNorm statistics that are not the identity and a
    sharper head, so that the top-5 is not a tie between near-equal probabilities."""
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"efficientnet_{name}")(weights=None).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        tv.classifier[1].weight.mul_(sharpen)
    return tv


@pytest.mark.parametrize("name", list(pretrained.FILES))
def test_each_file_is_torchvisions(name):
    """The file name (with its hash) and size of each variant's ImageNet weights are the ones
    torchvision's weights enum downloads."""
    official = getattr(torchvision.models, f"EfficientNet_{name.upper()}_Weights").IMAGENET1K_V1
    assert pretrained.url_for(pretrained.FILES[name]) == official.url
    assert pretrained.MEGABYTES[name] == official.meta["_file_size"]


def test_v2_s_from_the_cache_predicts_as_torchvision_and_fine_tunes(cache, monkeypatch, tmp_path):
    """--weights imagenet --model v2_s, the file already in the cache (no network): predict.py's
    top-5 and probabilities are torchvision's own model's with its own transform (384 bilinear);
    train.py fine-tunes it for an epoch with a new head, and its best.pth records V2-S's
    preprocessing, which predict.py then uses."""
    tv = torchvision_net("v2_s", sharpen=60)  # top-1 0.69, then 0.044, 0.033, ...
    cache.mkdir(parents=True)
    torch.save(tv.state_dict(), cache / pretrained.FILES["v2_s"])
    monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", dead_url())
    weights = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1
    with torch.no_grad():
        expected = tv(weights.transforms()(Image.open(PHOTO).convert("RGB"))[None]).softmax(1)[0].topk(5)
    result = run_script("predict.py", PHOTO, "--weights", "imagenet", "--model", "v2_s", "--topk", "5", "--json")
    got = json.loads(result.stdout)["topk"]
    assert [t["index"] for t in got] == expected.indices.tolist()
    assert [t["class"] for t in got] == [weights.meta["categories"][i] for i in expected.indices]
    assert max(abs(t["prob"] - p) for t, p in zip(got, expected.values.tolist())) < 1e-4
    assert result.stderr == ""

    data = copy_digits(tmp_path / "digits", per_class=6)
    run = tmp_path / "run"
    result = run_script("train.py", "--data-path", data, *FAST, "--epochs", "1", "--precise-bn", "0",
                        "--model", "v2_s", "--weights", "imagenet", "--output-dir", run)
    assert "EfficientNetV2-S at 32px, 3 classes" in result.stdout
    assert "has a 1000-class head; a new 3-class classifier is initialised" in result.stdout
    best = torch.load(run / "best.pth", weights_only=True)
    meta = best["meta"]
    assert (meta["variant"], meta["interpolation"], meta["eval_resize"], meta["eval_crop"], meta["bn_eps"]) == \
        ("v2_s", "bilinear", 32, 32, 1e-3)
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["args"]["weights"] == "imagenet"
    assert list(best["model"]) == list(tv.state_dict())  # torchvision's names, as the file had them
    result = run_script("predict.py", os.path.join(data, "1"), "--weights", run / "best.pth", "--json")
    assert len(result.stdout.splitlines()) == 6 and "fused oneDNN convs" in result.stderr


@pytest.fixture
def cached_b0(cache, monkeypatch):
    """torchvision's B0 (random weights) in the cache under the official name, and the mirror
    pointed at a dead port: any use of the network would fail the test."""
    tv = torchvision_net()
    cache.mkdir(parents=True)
    torch.save(tv.state_dict(), cache / B0)
    monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", dead_url())
    return tv


def test_predict_imagenet_equals_torchvision(cached_b0):
    """predict.py --weights imagenet: ImageNet names, torchvision's eval transform, and the same
    top-5 and probabilities as torchvision's own model with those weights."""
    weights = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1
    with torch.no_grad():
        x = weights.transforms()(Image.open(PHOTO).convert("RGB"))[None]
        expected = cached_b0(x).softmax(1)[0].topk(5)
    result = run_script("predict.py", PHOTO, "--weights", "imagenet", "--topk", "5", "--json")
    got = json.loads(result.stdout)["topk"]
    assert [t["index"] for t in got] == expected.indices.tolist()
    assert [t["class"] for t in got] == [weights.meta["categories"][i] for i in expected.indices]
    difference = max(abs(t["prob"] - p) for t, p in zip(got, expected.values.tolist()))
    print(f"largest probability difference to torchvision: {difference:.2e}")
    assert difference < 1e-4 and expected.values[0] > 0.05
    assert result.stderr == ""  # from the cache: no download, no note


def test_train_imagenet_fine_tunes_from_the_cached_file(cached_b0, tmp_path):
    """train.py --weights imagenet fine-tunes as --weights FILE does: a new classifier with a note,
    a quarter of the learning rate, and with --freeze-layers the frozen layers still exactly the
    cached file's after an epoch; the run records the name it was given."""
    data = copy_digits(tmp_path / "digits", per_class=6)
    result = run_script("train.py", "--data-path", data, *FAST, "--epochs", "1", "--precise-bn", "0",
                        "--freeze-layers", "--weights", "imagenet", "--output-dir", tmp_path / "run")
    assert "has a 1000-class head; a new 3-class classifier is initialised" in result.stdout
    assert "adamw lr 0.00025" in result.stdout
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    tv = cached_b0.state_dict()
    assert torch.equal(best["model"]["features.stem_conv.0.weight"], tv["features.0.0.weight"])
    assert torch.equal(best["model"]["features.7a.block.se.fc1.weight"], tv["features.7.0.block.2.fc1.weight"])
    assert not torch.equal(best["model"]["features.top.0.weight"], tv["features.8.0.weight"])  # trained
    assert best["meta"]["args"]["weights"] == "imagenet" and best["meta"]["bn_eps"] == 1e-5


def test_script_failure_is_one_line_and_leaves_the_cache_clean(cache, tmp_path, monkeypatch):
    """The official name with other bytes behind it (a broken mirror): exit 2, one line, no file."""
    with Server({f"models/{B0}": b"not torchvision's file"}) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        result = run_script("export.py", "--weights", "imagenet", "--format", "pt2", cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"downloading {server.url.rstrip('/')}/{B0}")
    assert len(lines) == 2 and lines[1].startswith("error: ") and "sha256 starts" in lines[1]
    assert listing(cache) == [] and listing(tmp_path) == ["torch"]


# train.py's main under torchrun, with the b0 file renamed to carry the test file's own hash
TRAIN_WITH_NAME = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch, pretrained, train
    pretrained.FILES["b0"] = {name!r}
""") + TRAIN_MAIN_UNDER_TORCHRUN


def test_torchrun_downloads_once(cache, tmp_path, monkeypatch):
    """Two processes under torchrun (--eval-only, the shortest way through train.py's main): rank 0
    downloads (one request), rank 1 waits, then both load the file and evaluate their share."""
    buffer = io.BytesIO()
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), buffer)
    content = buffer.getvalue()
    name = named(content)
    script = tmp_path / "train_with_name.py"
    script.write_text(TRAIN_WITH_NAME.format(root=ROOT, name=name))
    data = copy_digits(tmp_path / "digits", per_class=4)
    with Server({f"models/{name}": content}) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "--data-path", data, "--output-dir", str(tmp_path / "run"), *FAST, "--eval-only",
               "--weights", "imagenet", "--device", "cpu"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.requests == 1 and result.stderr.count("downloading ") == 1
    assert result.stdout.count("a new 3-class classifier") == 1  # rank 0 says it
    assert "predictions.csv: all 3" in result.stdout  # 3 validation images, gathered from both ranks
    assert listing(cache) == [name] and (cache / name).read_bytes() == content


@pytest.mark.parametrize("userinfo, user, password", [("ann:s%40cret", "ann", "s@cret"), ("ann", "ann", ""),
                                                      ("ann:pa:ss", "ann", "pa:ss")])
def test_credentials_in_the_mirror_url_are_sent_as_basic_auth_and_never_printed(cache, payload, monkeypatch, capsys,
                                                                                  userinfo, user, password):
    """EFFICIENTNET_WEIGHTS_URL=http://user:password@host/...: the download sends them as HTTP Basic
    auth (the password %-decoded) and prints the URL as http://***@host/...; with a wrong password
    the one-line error names the URL the same way. The secret is in no line."""
    name = pretrained.FILES["b0"]
    token = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    with Server({f"models/{name}": payload}, auth=token) as server:
        url = server.url.replace("http://", f"http://{userinfo}@")
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", url)
        assert open(pretrained.resolve("imagenet", "b0"), "rb").read() == payload
        err = capsys.readouterr().err
        assert err.startswith(f"downloading {server.url.replace('http://', 'http://***@')}{name} to ")
        os.remove(cache / name)
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url.replace("http://", "http://ann:wrong@"))
        message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    assert message.startswith(f"cannot download {server.url.replace('http://', 'http://***@')}{name}") \
        and "HTTP 401" in message
    for secret in [f"{userinfo}@", "ann:wrong", "wrong@"] + ([password] if password else []):
        assert secret not in err + message + capsys.readouterr().err
    assert listing(cache) == []


@pytest.mark.parametrize("mirror, words", [
    ("bad-length", "the server's Content-Length 'abc' is not a number"),
    ("huge", "the server would send 10000.0 MB for a file of 0.3 MB"),
    ("http://[::1/models", "not a URL"),
    ("http://127.0.0.1:99999/models", "not a URL"),
    ("ftp:/nowhere", "cannot download"),
])
def test_a_malformed_answer_or_url_is_one_line(cache, payload, monkeypatch, mirror, words):
    """A Content-Length that is not a number, or far larger than the file, and a URL that cannot be
    read (a broken IPv6 host, a port out of range) end in one line naming the mirror, never a
    ValueError traceback; nothing is left in the cache."""
    monkeypatch.setitem(pretrained.MEGABYTES, "b0", 0.3)
    with Server({f"models/{pretrained.FILES['b0']}": payload}, mode=mirror) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url if mirror in ("bad-length", "huge") else mirror)
        message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    assert message.startswith("cannot download ") and words in message and "EFFICIENTNET_WEIGHTS_URL=" in message
    assert listing(cache) == []


def test_an_answer_that_never_ends_stops_at_the_size_of_the_file(cache, payload, monkeypatch):
    """No Content-Length and no end (the file over and over): the download stops a little past the
    file's known size, blames the mirror, and keeps nothing, instead of filling the disk."""
    monkeypatch.setitem(pretrained.MEGABYTES, "b0", 0.3)
    with Server({f"models/{pretrained.FILES['b0']}": payload}, mode="endless") as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    assert "sent more than 1.4 MB for a file of 0.3 MB; nothing was kept: check the mirror" in message
    assert server.sent < 20e6 and listing(cache) == []  # of 300 MB on offer; loopback's buffers hold a few MB


def test_a_download_slower_than_the_time_limit_stops(cache, payload, monkeypatch):
    monkeypatch.setattr(pretrained, "TIME_LIMIT", 0.5)
    with Server({f"models/{pretrained.FILES['b0']}": payload}, delay=0.2) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    assert "took more than 0.5 s; nothing was kept: check the mirror" in message and listing(cache) == []


def test_a_download_killed_midway_leaves_a_temp_file_the_next_run_removes(cache, payload, monkeypatch):
    """kill -9 of a downloading process leaves its unfinished file in torch's cache; the next
    download removes it (and those of processes that have ended), but not one that a running
    process is writing, nor one of another machine that shares the folder."""
    name = pretrained.FILES["b0"]
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import pretrained; pretrained.FILES['b0'] = {name!r}; "
            "pretrained.resolve('imagenet', 'b0')")
    with Server({f"models/{name}": payload}, delay=0.5) as server:
        monkeypatch.setenv("EFFICIENTNET_WEIGHTS_URL", server.url)
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not [f for f in listing(cache) if f.endswith(".download")] and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        left = listing(cache)
        assert len(left) == 1 and left[0].startswith(f".{name}.{socket.gethostname()}.{proc.pid}."), left
        mine = cache / f".{name}.{socket.gethostname()}.{os.getpid()}.abcd.download"  # a running process's
        other = cache / f".{name}.another-host.{proc.pid}.abcd.download"
        for path in (mine, other):
            path.write_bytes(b"partial")
        server.delay = 0
        assert open(pretrained.resolve("imagenet", "b0"), "rb").read() == payload
    assert listing(cache) == sorted([mine.name, other.name, name])


@pytest.mark.parametrize("damage", [b"", b"not a zip", "half", "a flipped byte", "deflated"])
def test_a_damaged_file_in_the_cache_is_named_with_what_to_do(cached_b0, cache, damage):
    """An empty, truncated, overwritten, changed or repacked file under the official name in torch's
    cache: one line that it is the cached file, where it is, what is wrong and that deleting it makes
    the next run download it again (it said "not a PyTorch checkpoint: pass a .pth file", pointing
    at the user's own file; a changed byte in a tensor was loaded as it was)."""
    path = cache / B0
    data = path.read_bytes()
    if damage == "half":
        data = data[:len(data) // 2]
    elif damage == "a flipped byte":
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
    elif damage == "deflated":
        with zipfile.ZipFile(path) as stored, zipfile.ZipFile(cache / "packed", "w", zipfile.ZIP_DEFLATED) as packed:
            for entry in stored.infolist():
                packed.writestr(entry.filename, stored.read(entry))
        data = (cache / "packed").read_bytes()
        (cache / "packed").unlink()
    else:
        data = damage
    path.write_bytes(data)
    message = one_line_error(lambda: pretrained.resolve("imagenet", "b0"))
    why = {"a flipped byte": r"its entry \S+/data/\d+ fails its CRC check",
           "deflated": r"its entry \S+ is compressed, which torch.save never does"}
    assert re.fullmatch(re.escape(f"the cached file {path} is damaged (") + why.get(damage, r"truncated or empty")
                        + re.escape("); delete it, and the next run downloads it again"), message), message
    result = run_script("predict.py", PHOTO, "--weights", "imagenet", check=False)
    assert result.returncode != 0 and result.stderr == f"error: {message}\n"
