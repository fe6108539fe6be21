"""Where the scripts write: run folders, outputs that are inputs, links, FIFOs, long names, full disks."""
import argparse
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import errors
import export
import outputs
import predict
import saver
import train as train_script
from conftest import FAST, ROOT, assert_user_error, copy_digits, run_script, start, train, wait_for_epoch


# ---- run folders ------------------------------------------------------------------------------

def test_default_run_folders_never_overwrite(tiny_data, tmp_path):
    """Without --output-dir each run gets weights/<model>-<data>, then -2; an existing
    --output-dir is refused unless --exist-ok."""
    for _ in range(2):
        run_script("train.py", "--data-path", tiny_data, *FAST, "--epochs", "1", cwd=tmp_path)
    assert (tmp_path / "weights" / "b0-tiny" / "best.pth").is_file()
    assert (tmp_path / "weights" / "b0-tiny-2" / "best.pth").is_file()
    before = (tmp_path / "weights" / "b0-tiny" / "best.pth").read_bytes()
    refused = run_script("train.py", "--data-path", tiny_data, *FAST, "--output-dir", "weights/b0-tiny",
                         cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr == ("error: --output-dir weights/b0-tiny already holds files: pass --resume to continue "
                              "that run, --exist-ok to write into it anyway, or choose another folder\n")
    assert (tmp_path / "weights" / "b0-tiny" / "best.pth").read_bytes() == before


def test_run_folders_are_created_atomically(tmp_path, monkeypatch):
    """Another run creating the chosen folder between the look and the creation (a simulated race)
    does not make both runs share it: the next free name is taken."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights" / "b0-data").mkdir(parents=True)
    real_mkdir = os.mkdir

    def racing_mkdir(path, *args):
        if str(path).endswith("b0-data-2"):
            real_mkdir(path)  # the other run gets there first
        return real_mkdir(path, *args)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    args = argparse.Namespace(model="b0", data_path="some/data", output_dir=None, exist_ok=False)
    assert saver.make_run_dir(args) and args.output_dir == os.path.join("weights", "b0-data-3")
def test_a_failed_start_leaves_no_run_folder(tiny_data, tmp_path):
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "nope.pth", cwd=tmp_path),
                      "nope.pth")
    assert not (tmp_path / "weights").exists()


def test_unwritable_output_dir_fails_before_training(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = train("--data-path", tiny_data, *FAST, "--output-dir", tmp_path / "afile" / "run")
    assert_user_error(result, "cannot write", "--output-dir")
    assert "epoch 1" not in result.stdout


def test_two_processes_never_write_one_run(tiny_data, tmp_path):
    """A second --resume of a run that is still training is refused; the first goes on."""
    run = tmp_path / "run"
    first = start(["--data-path", tiny_data, "--output-dir", run, *FAST, "--epochs", "50"])
    wait_for_epoch(run, 1, first)
    second = train("--resume", run / "last.pth")
    assert_user_error(second, "another train.py (process ", "is writing to", str(run))
    assert first.poll() is None
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644)])
def test_output_files_honour_the_umask(tiny_data, tmp_path, umask, mode):
    out = tmp_path / "run"
    cmd = f"umask {umask:03o} && {sys.executable} {os.path.join(ROOT, 'train.py')} --data-path {tiny_data} " \
          f"--output-dir {out} " + " ".join(FAST) + " --epochs 1"
    subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, timeout=300)
    for name in ("best.pth", "last.pth", "metrics.csv", "curves.png", "class_indices.json"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == mode, name


# ---- predict.py's and export.py's outputs -----------------------------------------------------

def test_predict_writes_nothing_unless_asked(tiny_data, tmp_path):
    run_script("train.py", "--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1")
    work = tmp_path / "cwd"
    work.mkdir()
    result = run_script("predict.py", tiny_data, "--weights", tmp_path / "run" / "best.pth", cwd=work)
    assert os.listdir(work) == []
    # what it was asked for instead: one line per image on stdout, its path, one of the run's classes, a probability
    answers = [re.fullmatch(r"(.+): ([012]) \((0\.\d{3}|1\.000)\)", line) for line in result.stdout.splitlines()]
    assert all(answers), result.stdout
    assert sorted(a[1] for a in answers) == sorted(str(p) for p in Path(tiny_data).rglob("*.png"))
    result = run_script("predict.py", tiny_data, "--weights", tmp_path / "nope.pth", cwd=work, check=False)
    assert_user_error(result, "nope.pth", "not found")


def test_predict_checks_its_output_paths_before_predicting(tiny_data, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(train_script.create_model("b0", 3).state_dict(), weights)
    result = run_script("predict.py", tiny_data, "--weights", weights, "--csv", tmp_path / "no" / "p.csv", check=False)
    assert_user_error(result, "--csv", "does not exist")
    assert result.stdout == ""  # nothing was predicted first
    with pytest.raises(errors.UsageError, match="--plot .* is a folder"):
        outputs.check_output_file(str(tmp_path), "--plot")


def predict_args(*flags):
    return predict.get_args_parser().parse_args([str(f) for f in flags])


@pytest.fixture
def photos(tmp_path):
    """A folder of two images and a stand-in weights file (every check here comes before loading it)."""
    folder = copy_digits(tmp_path / "photos", classes=("0",), per_class=2)
    (tmp_path / "best.pth").write_bytes(b"weights")
    return tmp_path, os.path.join(folder, "0")


def test_outputs_that_are_inputs_or_each_other_are_refused_before_any_work(photos, tmp_path):
    """Before: --csv over the weights made best.pth a CSV, --plot over a photo replaced it, and
    --csv and --plot on one path kept only the plot."""
    _, images = photos
    first = os.path.join(images, sorted(os.listdir(images))[0])
    os.symlink(images, tmp_path / "link")
    cases = [(["--csv", tmp_path / "best.pth"], "--csv .* is also the --weights file"),
             (["--plot", tmp_path / "link" / os.path.basename(first)], "is also the image"),
             (["--csv", tmp_path / "out", "--plot", tmp_path / "out"], "--plot .* is also the --csv file"),
             (["--csv", os.path.join(images, ".", "x_cam.png"), "--cam", images], "--cam .* is also the --csv file")]
    (tmp_path / "x.png").write_bytes(b"")
    for flags, words in cases:
        with pytest.raises(errors.UsageError, match=words):
            predict.main(predict_args(tmp_path / "x.png", images, "--weights", tmp_path / "best.pth", *flags))
    assert (tmp_path / "best.pth").read_bytes() == b"weights" and not (tmp_path / "out").exists()


def test_export_refuses_a_sidecar_over_its_weights(tmp_path):
    (tmp_path / "m.pt2.json").write_bytes(b"weights")
    args = export.get_args_parser().parse_args(["--weights", str(tmp_path / "m.pt2.json"), "--format", "pt2",
                                                "--output", str(tmp_path / "m.pt2")])
    with pytest.raises(errors.UsageError, match="sidecar .* is also the --weights file"):
        export.main(args)


def test_a_cam_folder_that_cannot_be_made_is_refused_before_any_work(photos, tmp_path):
    """Before: predicted everything, then a traceback from os.makedirs."""
    _, images = photos
    (tmp_path / "notes").write_text("")
    with pytest.raises(errors.UsageError, match="not a writable folder"):
        predict.main(predict_args(images, "--weights", tmp_path / "best.pth", "--cam", tmp_path / "notes" / "cams"))


def test_cam_file_names_keep_within_255_bytes():
    """Before: a 244-byte image name made a temporary name over 255 bytes, and a longer one a map's name."""
    names = predict.cam_file_names(["a/" + "é" * 126 + ".png", "b/" + "é" * 126 + ".png", "c/x.png", "d/x.png"])
    assert all(len(os.fsencode(name)) <= 255 for name in names) and len(set(names)) == 4
    assert names[2:] == ["x_cam.png", "x_cam-2.png"] and names[1].endswith("_cam-2.png")


# ---- how a file is written: long names, links, FIFOs, a full disk, a signal -------------------

def test_a_long_file_name_is_written_whole(tmp_path):
    """The temporary file beside a 250-byte name. Before: its name passed 255 bytes (ENAMETOOLONG)."""
    path = tmp_path / ("n" * 250)
    outputs.atomic_write(str(path), lambda f: f.write(b"data"))
    assert path.read_bytes() == b"data" and os.listdir(tmp_path) == [path.name]


def test_outputs_write_through_links_and_into_fifos(tmp_path):
    """A link stays a link and its target gets the new content; a FIFO stays a FIFO and its reader
    gets the content. Before: both were replaced by a regular file."""
    (tmp_path / "target.csv").write_text("old")
    os.symlink("target.csv", tmp_path / "link.csv")
    outputs.atomic_write(str(tmp_path / "link.csv"), lambda f: f.write(b"new"))
    assert os.path.islink(tmp_path / "link.csv") and (tmp_path / "target.csv").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "target.csv"]

    fifo = str(tmp_path / "pipe.csv")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waiting, as a shell's >(gzip) is
    try:
        outputs.check_output_file(fifo, "--csv")
        outputs.atomic_write(fifo, lambda f: f.write(b"rows\n"))
        assert os.read(reader, 100) == b"rows\n"
    finally:
        os.close(reader)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "pipe.csv", "target.csv"]


def full_disk():
    """In the child: every file it writes may hold 100 bytes at most; a write past that fails
    with EFBIG, as one on a full disk fails with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(exported, tmp_path):
    """predict.py --csv and export.py's .pt2 on a full disk. Before: a traceback, and the pt2
    export aborted the process ("terminate called ... c10::Error", exit 134)."""
    path, images = exported
    cmd = [sys.executable, os.path.join(ROOT, "predict.py"), images, "--weights", path, "--csv", tmp_path / "p.csv"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=full_disk)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot write --csv {tmp_path / 'p.csv'}: File too large"
    code = ("import torch, export\n"
            "program = torch.export.export(torch.nn.Linear(64, 64), (torch.randn(1, 64),))\n"
            f"try:\n    export.save(program, 'pt2', {str(tmp_path / 'm.pt2')!r})\n"
            "except OSError as e:\n    print('OSError', e.strerror)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=full_disk)
    assert (result.returncode, result.stdout) == (0, "OSError File too large\n"), result.stderr[-2000:]
    assert os.listdir(tmp_path) == []


WRAPPER = """import os, runpy, signal, sys
import exported
# Ctrl-C as at a terminal: a suite started in the background of a shell inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
call = exported.ExportedModel.__call__
def interrupted(self, images):
    os.kill(os.getpid(), signal.{signal})  # as the user does while the --csv file is being written
    return call(self, images)
exported.ExportedModel.__call__ = interrupted
sys.argv = ["predict.py"] + sys.argv[1:]
runpy.run_path("predict.py", run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_writing_the_csv_leaves_nothing_and_says_so(exported, tmp_path, sig):
    """Before: SIGTERM left the .tmp file behind (killed, exit -15); Ctrl-C printed a traceback."""
    path, images = exported
    result = subprocess.run([sys.executable, "-c", WRAPPER.format(signal=sig), images, "--weights", path,
                             "--csv", tmp_path / "p.csv"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []
