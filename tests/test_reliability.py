"""Kills, signals, bad input and hostile files: a clear one-line message, the right exit code,
nothing lost, never a traceback for the user's own mistake."""
import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from PIL import Image

import checkpoint
import outputs
from conftest import FAST, ROOT, copy_digits, run_script, sigterm_then_kill_workers


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


# ---- bad data ---------------------------------------------------------------------------------

def test_missing_data_path(tmp_path):
    assert_user_error(train("--data-path", tmp_path / "nope", *FAST), "nope", "does not exist", "--data-path")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "images.zip"
    f.write_bytes(b"PK")
    assert_user_error(train("--data-path", f, *FAST), "images.zip", "is a file")


def test_folder_without_class_folders(tmp_path):
    shutil.copy(os.path.join(ROOT, "data", "digits", "0", "0000.png"), tmp_path / "a.png")
    assert_user_error(train("--data-path", tmp_path, *FAST), "0 usable class", "sub-folder")


def test_one_class_only(tmp_path):
    data = copy_digits(tmp_path / "d", classes=("5",))
    assert_user_error(train("--data-path", data, *FAST), "1 usable class", "at least 2")


def test_messy_folder_still_trains(tmp_path):
    """Empty class folders, a class with one image, broken files of every kind, odd image modes,
    EXIF rotation, unicode and spaces: the run finishes and lists what it left out."""
    data = tmp_path / "messy data"
    copy_digits(data, classes=("0", "1"), per_class=6)
    (data / "empty class").mkdir()
    (data / "solo").mkdir()
    shutil.copy(os.path.join(ROOT, "data", "digits", "2", "0002.png"), data / "solo" / "only one.png")
    uni = data / "café au lait"
    uni.mkdir()
    base = Image.open(os.path.join(ROOT, "data", "digits", "3", "0003.png")).convert("RGB").resize((40, 30))
    base.convert("CMYK").save(uni / "cmyk ünï.jpg")
    Image.fromarray((torch.arange(40 * 30).reshape(30, 40) * 50).numpy().astype("uint16")).save(uni / "grey16.png")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(uni / "palette+alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(uni / "rotated.jpg", exif=exif)
    base.save(uni / "plain.JPG")
    (data / "0" / "zero.jpg").write_bytes(b"")
    (data / "0" / "notes.png").write_text("not an image")
    full = (uni / "plain.JPG").read_bytes()
    (data / "1" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (data / "1" / ".DS_Store").write_bytes(b"\0\0")
    result = train("--data-path", data, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "empty class" in result.stderr and "skipped" in result.stderr
    assert "3 file(s) could not be used" in result.stderr
    assert all(name in result.stderr for name in ("zero.jpg", "notes.png", "truncated.jpg"))
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    assert best["meta"]["classes"] == ["0", "1", "café au lait", "solo"]


# ---- bad flags and weights --------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], ["--epochs", "at least 1"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--img-size", "8"], ["--img-size", "at least 32"]),
    (["--model", "b9"], ["--model", "invalid choice"]),
])
def test_nonsense_numbers_and_names(tiny_data, flags, words):
    assert_user_error(train("--data-path", tiny_data, *FAST, *flags), *words)


def test_weights_missing(tiny_data, tmp_path):
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "w.pth"), "not found", "w.pth")


def test_weights_not_a_checkpoint(tiny_data, tmp_path):
    (tmp_path / "w.pth").write_text("hello")
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "w.pth"),
                      "w.pth", "not a PyTorch checkpoint")


def test_weights_of_another_variant(tiny_data, tmp_path):
    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "b1.pth"),
                      "B1", "--model b1")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = None


def test_pickle_that_runs_code_is_refused(tiny_data, tmp_path):
    global SENTINEL
    SENTINEL = tmp_path / "pwned"
    torch.save({"model": Exploit()}, tmp_path / "evil.pth")
    result = train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "evil.pth")
    assert_user_error(result, "evil.pth", "refusing")
    assert not SENTINEL.exists()
    result = run_script("predict.py", os.path.join(tiny_data, "0"), "--weights", tmp_path / "evil.pth", check=False)
    assert_user_error(result, "refusing")
    assert not SENTINEL.exists()


def test_unwritable_output_dir_fails_before_training(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = train("--data-path", tiny_data, *FAST, "--output-dir", tmp_path / "afile" / "run")
    assert_user_error(result, "cannot write", "--output-dir")
    assert "epoch 1" not in result.stdout


def test_resume_with_other_classes(tiny_data, tmp_path):
    run_script("train.py", "--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1")
    other = copy_digits(tmp_path / "other", classes=("7", "8", "9"))
    result = train("--resume", tmp_path / "run" / "last.pth", "--data-path", other, "--epochs", "2")
    assert_user_error(result, "classes", "same data")
    assert epochs_logged(tmp_path / "run") == [1]


# ---- kills and signals ------------------------------------------------------------------------

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


def test_kill_9_then_resume_logs_every_epoch_once(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = start(["--data-path", tiny_data, "--output-dir", run, *FAST, "--epochs", "4"])
    wait_for_epoch(run, 1, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate()
    for name in ("best.pth", "last.pth"):  # whole files, never half-written
        torch.load(run / name, weights_only=True)
    run_script("train.py", "--resume", run / "last.pth")
    assert epochs_logged(run) == [1, 2, 3, 4]
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]  # a write cut short is cleaned up
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 4


def test_resume_at_once_after_kill_9_while_loader_workers_live_on(tiny_data, tmp_path):
    """kill -9 of train.py leaves its loader workers alive for seconds, and they held the run
    folder's lock (inherited through fork): a resume at once was refused with "another train.py is
    writing". The workers let go of it at start, so the resume goes on at once."""
    run = tmp_path / "run"
    proc = start(["--data-path", tiny_data, "--output-dir", run, *FAST, "--workers", "2", "--epochs", "50"])
    wait_for_epoch(run, 1, proc)
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        workers = [int(pid) for pid in f.read().split()]
    proc.kill()
    proc.wait()  # the process alone: communicate() would wait for the workers too, which hold its pipes
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    try:
        outputs.lock_folder(str(run))  # what the resume does first, here while the workers still live
        outputs.release_folders()
        assert [pid for pid in alive if os.path.exists(f"/proc/{pid}")], "the workers ended: nothing was tried"
        result = run_script("train.py", "--resume", run / "last.pth", "--epochs", "2", "--workers", "0",
                            process=True, check=False)
        assert result.returncode == 0 and "another train.py" not in result.stderr, result.stderr
    finally:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


def test_a_run_that_is_being_written_is_refused_naming_the_process(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = start(["--data-path", tiny_data, "--output-dir", run, *FAST, "--epochs", "50"])
    try:
        wait_for_epoch(run, 1, proc)
        result = run_script("train.py", "--resume", run / "last.pth", check=False)
        assert result.returncode == 2
        assert result.stderr == (f"error: another train.py (process {proc.pid}) is writing to {run} right now; wait "
                                 f"for it to end (stop it: kill {proc.pid}), or choose another --output-dir\n")
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c at a terminal", "scancel or kill -- -PGID", "kill PID"])
def test_signal_saves_and_prints_resume_command(tiny_data, tmp_path, sig, group):
    """A signal to train.py alone, or to its whole process group, data loader workers included (as
    Ctrl-C at a terminal and Slurm's scancel send it): exit 130, the resume command, no traceback
    (a worker ended by SIGTERM used to leave one from PyTorch's worker watchdog)."""
    run = tmp_path / "run"
    flags = [*FAST, "--workers", "2"] if group else FAST
    proc = start(["--data-path", tiny_data, "--output-dir", run, *flags, "--epochs", "50"], new_session=group)
    wait_for_epoch(run, 1, proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"python train.py --resume {run / 'last.pth'}" in err
    assert "Traceback" not in err, err
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["epoch"] >= 1 and len(last["history"]) == last["epoch"]


def test_a_worker_dying_after_the_signal_does_not_change_the_stop(tiny_data, tmp_path):
    """A loader worker that dies just after the signal (one still starting when Ctrl-C or
    `timeout` reached the whole group, before it could end quietly) stopped the run as an
    unexpected worker exit raised while train.py was saying how to resume, which then read
    "interrupted before training started". The stop must stay a stop: exit 130, the epoch, the
    resume command."""
    run = tmp_path / "run"
    proc = start(["--data-path", tiny_data, "--output-dir", run, *FAST, "--workers", "2", "--epochs", "50"])
    wait_for_epoch(run, 1, proc)
    sigterm_then_kill_workers(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted in epoch" in err and f"python train.py --resume {run / 'last.pth'}" in err, err
    assert "before training started" not in err and "Traceback" not in err, err


# ---- files are replaced whole or not at all ---------------------------------------------------

def test_failed_save_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "best.pth"
    checkpoint.save({"v": torch.ones(3)}, path)

    def broken_write(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        outputs.atomic_write(path, broken_write)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["best.pth"]


class CtrlCWhilePickled:
    """Sends this process SIGINT while torch.save is half-way through writing it."""
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return int, (7,)


def test_ctrl_c_during_a_save_finishes_the_file_first(tmp_path):
    """Ctrl-C in the middle of torch.save used to leave the zip writer broken and end in its own
    RuntimeError, a traceback; now the save completes and the interrupt follows it."""
    path = tmp_path / "last.pth"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in train.py
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save({"v": torch.ones(3), "late": CtrlCWhilePickled(), "w": torch.zeros(2)}, path)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)
    saved = torch.load(path, weights_only=False)
    assert saved["late"] == 7 and torch.equal(saved["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["last.pth"]


def test_predict_writes_nothing_unless_asked(tiny_data, tmp_path):
    run_script("train.py", "--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1")
    work = tmp_path / "cwd"
    work.mkdir()
    run_script("predict.py", tiny_data, "--weights", tmp_path / "run" / "best.pth", cwd=work)
    assert os.listdir(work) == []
    result = run_script("predict.py", tiny_data, "--weights", tmp_path / "nope.pth", cwd=work, check=False)
    assert_user_error(result, "nope.pth", "not found")
