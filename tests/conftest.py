import csv
import gc
import io
import math
import os
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "data", "digits")
sys.path.insert(0, ROOT)
import export  # noqa: E402
import exported as exported_files  # noqa: E402
import outputs  # noqa: E402
import train as train_script  # noqa: E402
from inference import fuse_bn  # noqa: E402
from model import create_model  # noqa: E402

# pytest-xdist's test processes share the cores: each computes with its share of them (the scripts
# it starts too, through OMP_NUM_THREADS). Two processes of two threads each on two cores made
# every training step several times slower: PyTorch's threads wait for each other spinning.
TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if TEST_PROCESSES > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // TEST_PROCESSES))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# the scripts that take --device; elsewhere than tests/test_cuda.py a test means the CPU (numbers
# compared with a CPU's, bitwise resumes), also on a machine with a GPU
DEVICE_SCRIPTS = ("train.py", "predict.py", "benchmark.py")


def run_script(script, *args, cwd=None, timeout=300, check=True, process=False):
    """Run one of the repo's scripts as a user would, on the CPU unless `args` name a --device;
    returns the CompletedProcess. train.py, predict.py and export.py run in this process (their
    __main__ block, as `python SCRIPT ARGS` runs it, with its own stdout, stderr and exit code),
    which spares each run the 3 s of importing torch again; `process=True`, a `cwd`, or
    SCRIPTS_IN_PROCESS=0 in the environment runs a new Python process instead."""
    args = [*map(str, args)]
    if script in DEVICE_SCRIPTS and "--device" not in args:
        args += ["--device", "cpu"]
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    if script in IN_PROCESS and not process and cwd is None and os.environ.get("SCRIPTS_IN_PROCESS") != "0":
        result = run_in_process(cmd, timeout)
    else:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        result = subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


IN_PROCESS = ("train.py", "predict.py", "export.py")


def sigterm_then_kill_workers(proc):
    """SIGTERM to a script's process, then SIGKILL to its data loader workers (its children): a
    worker dying just after the user's signal, as one still starting when it reached the group."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        workers = [int(pid) for pid in f.read().split()]
    assert workers, "no loader worker to kill"
    proc.send_signal(signal.SIGTERM)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)


def run_in_process(cmd, timeout):
    """`python SCRIPT ARGS` in this process: runpy runs the script as __main__ with sys.argv, stdout
    and stderr of its own; an exit code as Python's would be (SystemExit's, 1 and a traceback for
    an uncaught exception). A script still running after `timeout` seconds (blocked on a FIFO, say)
    gets a TimeoutError, as subprocess.run's timeout would end it. What a script sets for its
    process (signal handlers, warning filters, the RNG) is put back afterwards."""
    streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2)]
    saved = sys.argv, sys.stdout, sys.stderr
    handlers = {s: signal.getsignal(s)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD)}
    rng = torch.get_rng_state()
    sys.argv, (sys.stdout, sys.stderr) = cmd[1:], streams
    code = 0

    def too_long(signum, frame):
        raise TimeoutError(f"{' '.join(cmd)} still running after {timeout} s")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(timeout)
    try:
        with warnings.catch_warnings():
            runpy.run_path(cmd[1], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        signal.alarm(0)
        out, err = (stream.buffer.getvalue().decode("utf-8") for stream in streams)
        sys.argv, sys.stdout, sys.stderr = saved
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_rng_state(rng)
        gc.collect()  # the run's models, loaders and their worker processes go now, not in a later test
    return subprocess.CompletedProcess(cmd, code, out, err)


def copy_digits(dest, classes=("0", "1", "2"), per_class=10):
    """A tiny real dataset: the first images of a few digit classes, in class folders."""
    for c in classes:
        os.makedirs(os.path.join(dest, c), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(DIGITS, c)))[:per_class]:
            shutil.copy(os.path.join(DIGITS, c, name), os.path.join(dest, c, name))
    return str(dest)


def repository_state():
    """What a test must not change: git's view of the working tree and every file under weights/."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                            capture_output=True, text=True).stdout
    runs = sorted(os.path.relpath(os.path.join(d, f), ROOT)
                  for d, _, files in os.walk(os.path.join(ROOT, "weights")) for f in files)
    return status, runs


@pytest.fixture(scope="session", autouse=True)
def repository_left_as_it_was():
    """The suite writes only under its temporary folders, never into the repository (a user's
    weights/ least of all): the tree is the same after every test as before the first."""
    before = repository_state()
    yield
    after = repository_state()
    assert after == before, f"the tests changed the repository:\n{after}\nwas:\n{before}"


@pytest.fixture(scope="session", autouse=True)
def temporary_files_inside_pytests_folder(tmp_path_factory):
    """What the scripts and libraries put in the temporary folder (torchrun's rendezvous files,
    torch.compile's cache, multiprocessing's sockets) goes under pytest's own folder for this run,
    which pytest removes after a passing run (pytest.ini): the suite leaves nothing behind."""
    folder = tmp_path_factory.mktemp("tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(folder))
    patch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    yield
    patch.undo()


@pytest.fixture
def tiny_data(tmp_path):
    return copy_digits(tmp_path / "tiny")


# the end of a script that runs train.py's main in a torchrun process (after its own patches)
TRAIN_MAIN_UNDER_TORCHRUN = textwrap.dedent("""
    parser = train.get_args_parser()
    args = parser.parse_args()
    train.check_args(parser, args)
    code = train.main(args, parser)
    torch.distributed.destroy_process_group()
    sys.exit(code)
""")

# a short, cheap training run: 32 px, small batches, no worker processes
FAST = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "2"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real train.py run on a tiny digits folder, for the tests that only read it (predict,
    export, --eval-only, a run's outputs): (data folder, run folder, what the run printed)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    data = copy_digits(tmp / "digits", per_class=10)
    result = run_script("train.py", "--data-path", data, "--output-dir", tmp / "run", *FAST)
    return data, tmp / "run", result.stdout


# running train.py as a user does, and reading what a run wrote

def train(*args, cwd=None):
    return run_script("train.py", *args, cwd=cwd, check=False)


def assert_user_error(result, *words, code=2):
    """Exit code, no traceback, and a message that names the problem."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in message, message


def epochs_logged(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def start(args, cwd=None, new_session=False):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=new_session)


def wait_for_epoch(run_dir, epoch, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = os.path.join(run_dir, "metrics.csv")
        if os.path.exists(path) and len(epochs_logged(run_dir)) >= epoch:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach epoch %d" % epoch)


def run_main(*argv):
    """train.py's main on `argv` (on the CPU, as run_script), in this process: its exit code
    (UsageError raised, not printed)."""
    parser = train_script.get_args_parser()
    args = parser.parse_args([str(a) for a in argv] + ["--device", "cpu"])
    train_script.check_args(parser, args)
    try:
        return train_script.main(args, parser)
    finally:  # as the script's end does: the run folders it locked are free for the next command
        outputs.release_folders()


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """(data, run folder): copies of the session's finished 2-epoch run and of its data, to change."""
    data, run, _ = tiny_run
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "data", tmp_path / "run"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metrics(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_predictions(rows, top1):
    """Every validation image once, its class folder as the true class, right where predicted = true."""
    assert list(rows[0]) == ["path", "true", "predicted", "prob", "prob_true", "correct"]
    assert len(rows) == len({r["path"] for r in rows}) == 6  # 2 of each class's 10 images
    for r in rows:
        assert r["true"] == os.path.basename(os.path.dirname(r["path"])) and os.path.isfile(r["path"])
        assert int(r["correct"]) == (r["true"] == r["predicted"])
        assert 0 < float(r["prob_true"]) <= float(r["prob"]) <= 1
        assert (float(r["prob_true"]) == float(r["prob"])) >= bool(int(r["correct"]))
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(top1, abs=1e-4)  # top1 as printed


# files that are not what they look like

def save(path, img=None, fmt=None, **kwargs):
    """Write `img` (default: a small RGB image whose colour depends on the name) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if img is None:
        h = zlib.crc32(path.name.encode())
        img = Image.new("RGB", (8, 8), (h & 255, (h >> 8) & 255, (h >> 16) & 255))
    img.save(path, format=fmt, **kwargs)
    return str(path)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb_png(path, side=100_000):
    """A ~70-byte PNG whose IHDR claims side x side 8-bit grey pixels; nothing large is allocated."""
    data = (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\x00\x00"))
            + png_chunk(b"IEND", b""))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return str(path)


def write_truncated_jpeg(path):
    """The first half of a real 64x64 noise JPEG: the header is intact, the scan data is not."""
    rng = np.random.default_rng(0)
    full = Path(path).with_name("full_" + Path(path).name)
    save(full, Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), quality=95)
    data = full.read_bytes()
    full.unlink()
    Path(path).write_bytes(data[: len(data) // 2])
    return str(path)


# models, exported files and GPUs that the tests make up

def randomise(model, seed=0):
    """Random conv/linear weights and biases, and random BatchNorm statistics and affine terms.
    Running variances are log-uniform in [1e-3, 1] so that using the wrong eps shows clearly."""
    g = torch.Generator().manual_seed(seed)
    uniform = lambda n, lo, hi: torch.rand(n, generator=g) * (hi - lo) + lo  # noqa: E731
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                var = 10 ** uniform(m.num_features, -3, 0)
                m.running_var.copy_(var)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.weight.copy_(var.sqrt() * uniform(m.num_features, 0.5, 1.5))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(a B0 exported with --dynamic-batch at 32 px with its sidecar, a folder of 4 images)."""
    folder = tmp_path_factory.mktemp("exported")
    model = fuse_bn(create_model("b0", len(CLASSES))).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    path = str(folder / "m.pt2")
    export.save(export.export_program(model, 32, dynamic_batch=True), "pt2", path)
    exported_files.write_sidecar(path, {"variant": "b0"}, CLASSES, 36, 32, "pt2", True, None)
    return path, copy_digits(folder / "images", classes=("0", "1"), per_class=2)


class FakeGPUs:
    """torch.cuda as on a machine with `count` GPUs of compute capability `capability`. `events`
    lists the calls that act on a GPU, (name, device index); an index past the last GPU raises,
    as CUDA does. Each GPU's RNG state is a small tensor holding its index."""

    def __init__(self, monkeypatch, count, capability=(8, 0)):
        self.count, self.capability, self.current, self.events = count, capability, 0, []
        self.rng = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(count)}
        fakes = {
            "is_available": lambda: True,
            "device_count": lambda: self.count,
            "current_device": lambda: self.current,
            "get_device_capability": lambda device=None: self.capability,
            "get_device_name": lambda device=None: "a fake GPU",
            "is_bf16_supported": lambda including_emulation=True: True,  # T4 and V100 say so too (emulated)
            "set_device": self.set_device,
            "get_rng_state": lambda device="cuda": self.rng[self.index(device, "get_rng_state")].clone(),
            "set_rng_state": self.set_rng_state,
            "manual_seed_all": lambda seed: None,  # torch.manual_seed seeds every GPU through this
        }
        for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
            fakes[name] = lambda device=None, name=name: self.index(device, name) and 0
        for module in (torch.cuda, torch.cuda.random):  # get/set_rng_state_all call the names in torch.cuda.random
            for name, fake in fakes.items():
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, fake)

    def index(self, device, name):
        if device is None or device == "cuda":
            index = self.current
        else:
            index = device if isinstance(device, int) else torch.device(device).index
            index = self.current if index is None else index
        if not 0 <= index < self.count:
            raise IndexError(f"{name}: invalid device ordinal {index} on a machine with {self.count} GPU(s)")
        self.events.append((name, index))
        return index

    def set_device(self, device):
        self.current = self.index(device, "set_device")

    def set_rng_state(self, state, device="cuda"):
        self.rng[self.index(device, "set_rng_state")] = state.clone()
