"""Stopping and resuming a run: signals, kill -9, locks, dying workers, full disks, divergence."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import checkpoint
import my_dataset
import outputs
import utils
from conftest import (FAST, ROOT, assert_user_error, copy_digits, epochs_logged, metrics, read_csv,
                      run_main, run_script, sigterm_then_kill_workers, start, train,
                      wait_for_epoch)


# ---- --resume ---------------------------------------------------------------------------------

def test_resume_continues_without_repeating_epochs(tiny_data, tmp_path):
    """--resume continues at the next epoch with the saved schedule; metrics hold each epoch once."""
    out = tmp_path / "run"
    run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST, "--epochs", "1")
    first = torch.load(out / "last.pth", weights_only=True)
    result = run_script("train.py", "--resume", out / "last.pth", "--epochs", "3")
    assert "resuming" in result.stdout and "epoch 2/3" in result.stdout and "epoch 1/3" not in result.stdout
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["val_top1"]) == pytest.approx(first["history"][0]["val_top1"], abs=1e-6)
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and last["meta"]["args"]["img_size"] == 32  # flags come from the run
    # the schedule went on from step 3 (3 batches of 8 per epoch), not from zero
    assert last["scheduler"]["last_epoch"] == 3 * 3


def test_resume_of_a_finished_run_says_so_and_how_to_train_longer(run_copy, capsys):
    """The tiny run trained all of its 2 epochs: --resume says so, names --epochs, exits 0 and
    leaves every file of the run as it was (before: "resuming at epoch 3", then "done")."""
    _, run = run_copy
    before = {name: (run / name).read_bytes() for name in sorted(os.listdir(run))}
    assert run_main("--resume", run / "last.pth") == 0
    out, err = capsys.readouterr()
    assert out == (f"{run / 'last.pth'} has finished its run: it holds epoch 2 of --epochs 2 (best.pth holds epoch "
                   f"{torch.load(run / 'best.pth', weights_only=True)['epoch']}). To train it longer: python train.py "
                   f"--resume {run / 'last.pth'} --epochs M, with M more than 2\n") and err == ""
    assert {name: (run / name).read_bytes() for name in sorted(os.listdir(run))} == before
    assert run_main("--resume", run / "last.pth", "--epochs", "3", "--workers", "0") == 0
    assert "resuming" in capsys.readouterr().out and len(metrics(run)) == 3


def test_resume_with_other_classes(tiny_data, tmp_path):
    run_script("train.py", "--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1")
    other = copy_digits(tmp_path / "other", classes=("7", "8", "9"))
    result = train("--resume", tmp_path / "run" / "last.pth", "--data-path", other, "--epochs", "2")
    assert_user_error(result, "classes", "same data")
    assert epochs_logged(tmp_path / "run") == [1]


def val_files(data):
    """The validation images of the tiny run's split (--val-rate 0.2, --seed 0), relative to `data`."""
    split = utils.read_split_data(str(data), 0.2, 0)
    return [os.path.relpath(p, data) for p in split.val_images], split


def test_resume_keeps_its_split_and_compares_epochs_on_the_same_images(run_copy, monkeypatch, capsys):
    """Files change between two sessions of a run: four validation images and a training image go,
    a new image comes. The resumed run goes on with the files it started with (the new one unused,
    no training image moved into validation, predictions.csv still naming its own files), names the
    missing training image once, and an epoch that could read 2 of the 6 validation images does not
    replace best.pth, even where it scores 1.0 on them."""
    data, run = run_copy
    val, split = val_files(data)
    best_before = torch.load(run / "best.pth", weights_only=True)
    for name in val[:4]:
        os.remove(data / name)
    gone_train = split.train_images[-1]
    os.remove(gone_train)
    shutil.copy(split.train_images[0], data / "0" / "new.png")
    evaluate = utils.evaluate
    monkeypatch.setattr(utils, "evaluate", lambda *a, **k: dict(evaluate(*a, **k), val_top1=1.0))

    assert run_main("--resume", run / "last.pth", "--epochs", "3", "--data-path", data) == 0
    out, err = capsys.readouterr()
    assert "note: 1 image file(s) added to" in err and "5 file(s) the run was started with are gone" in err
    assert err.count(f"skipping unreadable image {gone_train}") == 1  # the training and BatchNorm loaders met it
    assert "4 of 6 validation images could not be read" in out and "was scored on more of them, so it stays" in err
    best = torch.load(run / "best.pth", weights_only=True)
    assert (best["epoch"], best["val_top1"]) == (best_before["epoch"], best_before["val_top1"])
    assert f"done: best val top-1 {best_before['val_top1']:.4f}" in out
    last = torch.load(run / "last.pth", weights_only=True)
    train, _, kept_val, _ = checkpoint.unpack_split(last["split"], str(data))
    assert [os.path.relpath(p, data) for p in kept_val] == val
    assert [os.path.basename(p) for p in train] == [os.path.basename(p) for p in split.train_images]
    rows = (run / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(os.path.relpath(r.split(",")[0], data) for r in rows) == sorted(val)


def test_no_readable_validation_image_stops_with_the_resume_command(run_copy, capsys):
    """Every validation image truncated after its header: the epoch's training is saved, and the run
    stops with one line that says so and how to resume (exit 1), not with a KeyError traceback (in
    a first epoch) or as if all were well (in a later one); --eval-only says so too (exit 1)."""
    data, run = run_copy
    for name in val_files(data)[0]:
        whole = (data / name).read_bytes()
        (data / name).write_bytes(whole[: len(whole) // 2])
    assert run_main("--resume", run / "last.pth", "--epochs", "3", "--data-path", data) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no validation image could be read in epoch 3"), line
    assert "last.pth holds epoch 3" in line and f"python train.py --resume {run / 'last.pth'}" in line
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 3 and epochs_logged(run) == [1, 2, 3]
    assert run_main("--eval-only", "--resume", run / "last.pth", "--data-path", data) == 1  # --eval-only too
    assert "none of the 6 validation images could be read" in capsys.readouterr().err
    assert not (run / "eval").exists()


# ---- kill -9, then --resume; a run being written ----------------------------------------------

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


def test_kill_9_and_resume_is_exact_with_two_workers(tmp_path):
    """With --workers 2, a run killed after epoch 1 and resumed ends with exactly the weights and
    losses of an uninterrupted run: shuffle order and augmentation depend on seed, epoch and image."""
    data = copy_digits(tmp_path / "data", per_class=8)
    flags = ["--data-path", data, "--img-size", "32", "--batch-size", "6", "--workers", "2", "--epochs", "2"]
    run_script("train.py", *flags, "--output-dir", tmp_path / "whole")
    proc = start([*flags, "--output-dir", tmp_path / "cut"])
    wait_for_epoch(tmp_path / "cut", 1, proc)
    proc.kill()
    proc.communicate()
    run_script("train.py", "--resume", tmp_path / "cut" / "last.pth")
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    assert [r["train_loss"] for r in cut["history"]] == [r["train_loss"] for r in whole["history"]]
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])


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
        assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2 and epochs_logged(run) == [1, 2]
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


# ---- signals, at any moment -------------------------------------------------------------------

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


PATCHED = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, {root!r})
    import checkpoint, model_files, reports, utils
    {patch}
    sys.argv = [{script!r}] + sys.argv[1:]
    runpy.run_path({script!r}, run_name="__main__")
""")


def run_patched(tmp_path, patch, *args):
    """train.py with one function replaced, as a user runs it (signals and exits included)."""
    script = tmp_path / "patched_train.py"
    script.write_text(PATCHED.format(root=ROOT, script=os.path.join(ROOT, "train.py"), patch=textwrap.dedent(patch)))
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def interrupted_in(function, tmp_path, *args):
    """train.py with a Ctrl-C arriving while `function` (module.name) runs."""
    patch = f"""
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        {function} = interrupted
    """
    return run_patched(tmp_path, patch, *args)


def test_signal_during_start_up_leaves_no_half_made_run_folder(tiny_data, tmp_path):
    """Ctrl-C while the run folder is being set up: one line, exit 130, and the folder is gone
    (it had no last.pth to resume from)."""
    result = interrupted_in("model_files.write_class_indices", tmp_path, "--data-path", tiny_data,
                            "--output-dir", tmp_path / "run", *FAST)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "interrupted before training started" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("delay", [0.5, 2.5])
def test_real_signals_at_any_moment_of_start_up(tiny_data, tmp_path, delay):
    """SIGINT at some moment of start-up (imports, the scan, the model, the first save): no
    traceback, and any run folder left behind can be resumed."""
    proc = start(["--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST], cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert not (tmp_path / "run").exists() or (tmp_path / "run" / "last.pth").is_file()


def test_a_signal_that_a_library_turns_into_another_error_still_stops_quietly(tiny_data, tmp_path):
    """Ctrl-C inside a library's lazy import can come out as another error (numpy: "module 'numpy'
    has no attribute 'matrix'"); the user asked to stop, so it is the one-line interrupt, not a traceback."""
    patch = """
        import os, signal, my_dataset
        def init(self, paths):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                signal.sigtimedwait([], 0.5)  # let the handler run here, inside the 'library'
            except KeyboardInterrupt:
                raise AttributeError("module 'numpy' has no attribute 'matrix'") from None
        my_dataset.PackedPaths.__init__ = init
    """
    result = run_patched(tmp_path, patch, "--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "interrupted before training started" in result.stderr


def test_a_signal_that_a_library_swallows_while_loading_still_stops(tiny_data, tmp_path):
    """Ctrl-C while train.py's libraries load, caught by one of them (numpy's lazy imports did, and
    the run went on to fail later with "no attribute 'matrix'"): train.py stops once they are loaded."""
    patch = """
        import builtins, os, signal
        real_import = builtins.__import__
        def swallowing_import(name, *args, **kwargs):
            if name == "pretrained":  # imported by train.py as it loads
                builtins.__import__ = real_import
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    signal.sigtimedwait([], 0.5)
                except SystemExit:  # a library that catches everything
                    pass
            return real_import(name, *args, **kwargs)
        builtins.__import__ = swallowing_import
    """
    result = run_patched(tmp_path, patch, "--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "interrupted before training started" in result.stderr and not (tmp_path / "run").exists()


def test_interrupt_before_any_epoch_finished_says_so(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = interrupted_in("utils.train_one_epoch", tmp_path, "--data-path", tiny_data, "--output-dir", run, *FAST)
    assert result.returncode == 130 and "no epoch finished yet" in result.stderr
    assert "holds epoch 0" not in result.stderr
    result = run_script("train.py", "--resume", run / "last.pth", "--epochs", "1")
    assert "at epoch 1 (no epoch had finished)" in result.stdout and "-1.0000" not in result.stdout


def test_signal_while_drawing_the_final_plots(tiny_data, tmp_path):
    """Ctrl-C after the last epoch, while the last plots are drawn: the run is complete and says so."""
    result = interrupted_in("reports.plot_confusion", tmp_path, "--data-path", tiny_data, "--output-dir", tmp_path / "run",
                            *FAST, "--epochs", "1")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "the run is complete" in result.stderr
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1


# ---- a killed worker, a closed pipe, a closed terminal ----------------------------------------

def test_killed_loader_worker_stops_with_the_resume_command(run_copy, monkeypatch, capsys):
    """A data loader worker killed (SIGKILL, as the out-of-memory killer sends it): one line naming
    it, what last.pth holds and how to resume with fewer workers; exit 1."""
    data, run = run_copy
    here, load = os.getpid(), my_dataset.load_rgb

    def killed_in_a_worker(*args, **kwargs):
        if os.getpid() != here:
            os.kill(os.getpid(), signal.SIGKILL)
        return load(*args, **kwargs)
    monkeypatch.setattr(my_dataset, "load_rgb", killed_in_a_worker)
    assert run_main("--resume", run / "last.pth", "--epochs", "3", "--data-path", data, "--workers", "1") == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith('error: a data loader worker died in epoch 3 ("DataLoader worker (pid'), line
    assert "last.pth holds epoch 2" in line and "--workers 0" in line and "python train.py --resume" in line


def test_closed_pipe_and_closed_terminal(tmp_path):
    """`train.py | head -1`, then the terminal closed (SIGHUP to the process group, loader workers
    included): training goes on after nobody reads its output (it is not a full disk), and the
    hang-up stops it as Ctrl-C does: exit 130, last.pth kept, the resume command on stderr."""
    run, data = tmp_path / "run", copy_digits(tmp_path / "data", per_class=4)  # one step an epoch
    proc = start(["--data-path", data, "--output-dir", run, *FAST, "--workers", "1", "--epochs", "50",
                  "--device", "cpu"], new_session=True)
    assert proc.stdout.readline().startswith("EfficientNet-B0")
    proc.stdout.close()  # the reader is gone: every later line meets a closed pipe
    deadline = time.time() + 240
    while not (os.path.exists(run / "metrics.csv") and len(epochs_logged(run)) >= 2):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGHUP)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, err
    assert f"python train.py --resume {run / 'last.pth'}" in err and "Traceback" not in err, err
    assert "free some space" not in err and "nothing reads the standard output" in err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] >= 2


# ---- a full disk, a diverging run -------------------------------------------------------------

def test_disk_full_is_one_line_with_the_resume_command(tiny_data, tmp_path):
    """The third checkpoint write (epoch 1's last.pth) fails as on a full disk: exit 1, one line
    that says what failed, which epoch last.pth holds and how to resume; last.pth is intact."""
    patch = """
        import errno
        real, calls = checkpoint.save, []
        def save(obj, path):
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", path)
            real(obj, path)
        checkpoint.save = save
    """
    run = tmp_path / "run"
    result = run_patched(tmp_path, patch, "--data-path", tiny_data, "--output-dir", run, *FAST)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "No space left on device" in message and "last.pth" in message and "no epoch finished yet" in message
    assert f"train.py --resume {run / 'last.pth'}" in message
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 0
def test_diverging_run_stops_with_exit_1_and_resumes_with_a_lower_lr(tiny_data, tmp_path):
    """--lr 1e30 with one step per epoch: the run stops with exit 1 naming the epoch, saves no
    best.pth, and the advice works: --resume with --lr continues the run at the new rate."""
    out = tmp_path / "run"
    flags = ["--img-size", "32", "--workers", "0", "--epochs", "3", "--batch-size", "32", "--optimizer", "sgd"]
    result = train("--data-path", tiny_data, "--output-dir", out, *flags, "--lr", "1e30")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "NaN or infinite" in result.stderr or "became nan" in result.stderr.lower()
    assert "--resume" in result.stderr and "--lr" in result.stderr
    assert not (out / "best.pth").exists()
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 0

    result = run_script("train.py", "--resume", out / "last.pth", "--lr", "0.01")
    assert "resuming with --lr 0.01 (was 1e+30)" in result.stdout
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and last["meta"]["args"]["lr"] == 0.01
    assert last["optimizer"]["param_groups"][0]["initial_lr"] == 0.01
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())

