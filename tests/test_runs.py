"""A run's own files and what it is scored on: --eval-only on the weights a run saved, a resumed
run on the files it started with, epochs compared on the same validation images, and runs that
meet a dead pipe, a closed terminal or a killed loader worker. Most tests call train.main on a
copy of the session's tiny run, in this process: a subprocess only where a real pipe or signal
is the point."""
import fcntl
import os
import shutil
import signal
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import errors
import my_dataset
import outputs
import train as train_script
import utils
from conftest import FAST, copy_digits
from test_hostile import flag_error, make_class, png
from test_reliability import epochs_logged, start


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


def val_files(data):
    """The validation images of the tiny run's split (--val-rate 0.2, --seed 0), relative to `data`."""
    split = utils.read_split_data(str(data), 0.2, 0)
    return [os.path.relpath(p, data) for p in split.val_images], split


# ---- --eval-only ------------------------------------------------------------------------------

def test_eval_only_resume_scores_the_ema_and_leaves_the_run_as_it_was(run_copy, tmp_path, capsys):
    """--eval-only --resume last.pth scores the EMA weights the run scored (its last epoch's loss),
    writes to a new folder eval/ (then eval-2/, ...) in the run, never over the run's own
    predictions.csv, honours --output-dir, and writes into a run folder only when no train.py
    holds it and with --exist-ok."""
    data, run = run_copy
    last = torch.load(run / "last.pth", weights_only=True)
    own = (run / "predictions.csv").read_bytes()
    assert run_main("--eval-only", "--resume", run / "last.pth", "--workers", "0") == 0
    assert f"loss {last['history'][-1]['val_loss']:.4f}  top-1 {last['history'][-1]['val_top1']:.4f}" \
        in capsys.readouterr().out
    assert (run / "predictions.csv").read_bytes() == own
    assert (run / "eval" / "predictions.csv").exists()
    assert run_main("--eval-only", "--resume", run / "last.pth", "--workers", "0", "--output-dir",
                    tmp_path / "mine") == 0
    assert (tmp_path / "mine" / "predictions.csv").exists()

    training = os.open(run, os.O_RDONLY | os.O_DIRECTORY)  # as a train.py still writing the run holds it
    fcntl.flock(training, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(errors.UsageError, match="another train.py .*is writing to"):
            run_main("--eval-only", "--resume", run / "last.pth", "--workers", "0", "--output-dir", run, "--exist-ok")
    finally:
        os.close(training)
    with pytest.raises(errors.UsageError, match="already holds predictions.csv and mistakes.png: .* --exist-ok"):
        run_main("--eval-only", "--resume", run / "last.pth", "--workers", "0", "--output-dir", run)
    assert (run / "predictions.csv").read_bytes() == own


def test_eval_only_weights_takes_size_and_classes_from_the_checkpoint(run_copy, tmp_path, capsys):
    """A 32 px best.pth is scored at 32 px without --img-size (its epoch's loss and top-1, not a
    224 px guess), and data whose class folders differ from the checkpoint's is refused."""
    data, run = run_copy
    best = torch.load(run / "best.pth", weights_only=True)
    row = torch.load(run / "last.pth", weights_only=True)["history"][best["epoch"] - 1]
    assert run_main("--eval-only", "--weights", run / "best.pth", "--data-path", data, "--workers", "0",
                    "--output-dir", tmp_path / "e") == 0
    assert f"loss {row['val_loss']:.4f}  top-1 {best['val_top1']:.4f}" in capsys.readouterr().out
    os.rename(data / "2", data / "two")
    with pytest.raises(errors.DataError, match=r"has classes \['0', '1', 'two'\], but .*best.pth was trained on"):
        run_main("--eval-only", "--weights", run / "best.pth", "--data-path", data, "--workers", "0",
                 "--output-dir", tmp_path / "e2")


# ---- resumed runs -----------------------------------------------------------------------------

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


# ---- flags and folders ------------------------------------------------------------------------

def test_img_size_is_capped_before_anything_is_made(capsys):
    message = flag_error(["--img-size", "30000"], capsys)
    assert "--img-size" in message and "at most 1024" in message


def test_images_beside_the_class_folders_are_named(tmp_path, capsys):
    root = tmp_path / "data"
    make_class(root / "a", 3)
    make_class(root / "b", 3, value=9)
    png(root / "stray1.png")
    png(root / "STRAY2.PNG")
    split = utils.read_split_data(str(root), 0.3, seed=0)
    assert len(split.train_images + split.val_images) == 6
    err = capsys.readouterr().err
    assert err.count(f"2 image file(s) directly in {root} are not in a class folder; left out") == 1


def test_hard_links_to_one_file_count_once(tmp_path):
    """Two hard links to one image in a class (as copies made with cp -l are): one image, the other
    named; symbolic links were counted once already."""
    root = tmp_path / "data"
    make_class(root / "a", 3)
    make_class(root / "b", 3, value=9)
    os.link(root / "a" / "0.png", root / "a" / "z.png")
    os.link(root / "a" / "1.png", root / "b" / "z.png")  # in another class: the first class keeps it
    split = utils.read_split_data(str(root), 0.3, seed=0)
    images = split.train_images + split.val_images
    assert len(images) == 6 and not any(p.endswith("z.png") for p in images)
    why = dict(split.broken)
    assert why[str(root / "a" / "z.png")] == f"the same file as {root / 'a' / '0.png'}; counted once"
    assert str(root / "b" / "z.png") in why


def test_float_tiff_with_nan_pixels_decodes_the_others(tmp_path):
    """NaN (no data) pixels in a float TIFF become black; the others keep their scale (0.5 is mid
    grey, not 0), without a numpy warning that names no file."""
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[np.nan, 0.5], [1.0, 0.25]], dtype=np.float32), "F").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = np.asarray(my_dataset.load_rgb(str(path)))[..., 0]
    assert pixels.tolist() == [[0, 128], [255, 64]]


def test_many_left_out_files_are_counted_by_reason_and_listed_in_the_run_folder(tmp_path, capsys):
    """900 hard links to one image and 3 broken files: a line per reason with its count and first
    paths instead of 903 lines before training, and the whole list in left_out.txt in the run
    folder, which the summary names."""
    root = tmp_path / "data"
    make_class(root / "a", 4)
    make_class(root / "b", 4, value=9)
    for i in range(900):
        os.link(root / "a" / "0.png", root / "a" / f"link{i:03d}.png")
    for i in range(3):
        (root / "b" / f"broken{i}.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    assert run_main("--data-path", root, "--output-dir", run, *FAST[:-1], "1") == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ") or "left out" in line]
    assert warning[0] == "warning: 903 file(s) could not be used and are left out:"
    assert warning[1] == (f"  900 x the same file as another; counted once: {root / 'a' / 'link000.png'}, "
                          f"{root / 'a' / 'link001.png'}, {root / 'a' / 'link002.png'}, ...")
    kind, paths = warning[2].split(": ", 1)
    assert kind == "  3 x not an image Pillow can read"
    assert sorted(paths.split(", ")) == [str(root / "b" / f"broken{i}.png") for i in range(3)]
    assert warning[3] == "  the whole list: left_out.txt in the run folder" and len(warning) == 4
    listed = (run / "left_out.txt").read_text().splitlines()
    assert len(listed) == 903 and listed[0] == f"{root / 'a' / 'link000.png'}\tthe same file as {root / 'a' / '0.png'}; " \
        "counted once"
