import gc
import io
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import traceback
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "data", "digits")
sys.path.insert(0, ROOT)

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
    insight, export): (data folder, run folder, what the run printed)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    data = copy_digits(tmp / "digits", per_class=10)
    result = run_script("train.py", "--data-path", data, "--output-dir", tmp / "run", *FAST)
    return data, tmp / "run", result.stdout

