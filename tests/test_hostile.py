"""Hostile folders, bad flags and unlucky signals: data that must not be silently wrong, failed
runs that must not look like successes, and starts and stops that leave nothing broken behind."""
import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from PIL import Image

import train as train_script
import errors
import model_files
import my_dataset
import outputs
import runtime
import saver
import transforms
import utils
from conftest import FAST, ROOT, copy_digits, run_script
from test_data import write_bomb_png, write_truncated_jpeg
from test_reliability import assert_user_error, start, train, wait_for_epoch


def png(path, size=(8, 8), value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", size, value).save(path)
    return str(path)


def make_class(folder, n, value=0):
    return [png(os.path.join(folder, f"{i}.png"), value=value + 10 * i) for i in range(n)]


# ---- data can be silently wrong ---------------------------------------------------------------

def test_symlink_loops_and_shared_files_count_each_real_file_once(tmp_path, capsys):
    """Links back up the tree (self -> ., up -> .., top -> ../..), a class folder linked from
    outside, links to another class's folder, sub-folder and file in either sorting order, and two
    links to one outside file: every real file is counted once, in the class whose folder holds
    it, in train or val but never both; each link left out is named."""
    root = tmp_path / "data"
    make_class(root / "a", 6)
    make_class(root / "b", 4, value=5)
    make_class(root / "b" / "sub", 2, value=3)
    make_class(tmp_path / "elsewhere", 6, value=7)
    png(tmp_path / "outside.png")
    os.symlink(".", root / "a" / "self")
    os.symlink("..", root / "a" / "up")
    os.symlink("../..", root / "b" / "top")
    os.symlink("../b/sub", root / "a" / "into_b")  # "a" is walked first: b's images stay b's
    os.symlink("../b/0.png", root / "a" / "b_file.png")
    os.symlink("../a", root / "b" / "to_a")
    os.symlink("../a/0.png", root / "b" / "zz_link.png")
    os.symlink(tmp_path / "elsewhere", root / "c")  # users link class folders in: that is a class
    for name in ("x.png", "y.png"):
        os.symlink(tmp_path / "outside.png", root / "a" / name)
    split = utils.read_split_data(str(root), 0.5, seed=0)
    assert split.classes == ["a", "b", "c"]
    images = split.train_images + split.val_images
    reals = [os.path.realpath(p) for p in images]
    assert len(images) == 19 and len(set(reals)) == 19  # 6 + 6 + 6 + outside.png once
    assert not {os.path.realpath(p) for p in split.train_images} & {os.path.realpath(p) for p in split.val_images}
    base = os.path.realpath(tmp_path)
    owner = {"data/a": 0, "outside.png": 0, "data/b": 1, "elsewhere": 2}  # where each real file lies
    for real, label in zip(reals, split.train_labels + split.val_labels):
        place = os.path.relpath(real, base)
        assert label == next(v for k, v in owner.items() if place.startswith(k)), (place, label)
    left_out = {os.path.basename(p): why for p, why in split.broken}
    assert set(left_out) == {"up", "top", "into_b", "b_file.png", "to_a", "zz_link.png", "y.png"}
    assert "class folder 'b'" in left_out["into_b"] and "class folder 'a'" in left_out["zz_link.png"]
    assert "back up" in left_out["up"] and "the same file as" in left_out["y.png"]
    assert "left out" in capsys.readouterr().err


def test_fifo_named_like_an_image_is_never_opened(tmp_path):
    """A FIFO called photo.jpg beside a good image: training's scan names it and goes on, predict.py
    predicts the good image and names the FIFO (in a folder and on the command line); nothing hangs."""
    data = tmp_path / "data"
    make_class(data / "a", 3)
    make_class(data / "b", 3, value=9)
    os.mkfifo(data / "a" / "photo.jpg")
    split = utils.read_split_data(str(data), 0.3, seed=0)
    assert len(split.train_images + split.val_images) == 6
    assert split.broken[0][0] == str(data / "a" / "photo.jpg") and "not a regular file" in split.broken[0][1]

    weights = tmp_path / "w.pth"
    torch.save(train_script.create_model("b0", 2).state_dict(), weights)
    for target in (data / "a", data / "a" / "photo.jpg"):
        result = run_script("predict.py", target, "--weights", weights, "--workers", "0", check=False, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "photo.jpg: error: not a regular file" in result.stderr
        assert ("0.png:" in result.stdout) == (target == data / "a")


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    """A 101-byte 20000x1 PNG would become a 5-gigapixel image in evaluation's resize: the scan and
    predict.py name it, quickly, without decoding it."""
    thin = png(tmp_path / "data" / "a" / "thin.png", size=(20000, 1))
    assert os.path.getsize(thin) < 200
    make_class(tmp_path / "data" / "a", 2)
    make_class(tmp_path / "data" / "b", 2)
    assert "aspect ratio" in utils.check_image(thin)
    weights = tmp_path / "w.pth"
    torch.save(train_script.create_model("b0", 2).state_dict(), weights)
    started = time.time()
    result = run_script("predict.py", thin, "--weights", weights, check=False, timeout=120)
    assert result.returncode == 1 and "aspect ratio over 50:1" in result.stderr
    assert time.time() - started < 60
    assert utils.check_image(png(tmp_path / "panorama.png", size=(1200, 100))) is None  # 12:1 is fine


def test_file_names_that_are_not_utf8(tmp_path):
    """A class folder and a file whose names are not UTF-8: training splits and trains, predict.py
    prints, writes CSV (the names' bytes as on disk) and JSON (valid, escaped)."""
    data = tmp_path / "data"
    latin1 = os.fsdecode(b"caf\xe9")  # 'café' in Latin-1: not UTF-8
    copy_digits(data, classes=("0", "1"), per_class=6)
    copy_digits(data / "x", classes=("2",), per_class=6)
    os.rename(data / "x" / "2", data / latin1)
    os.rename(data / "1" / "0001.png", data / "1" / os.fsdecode(b"\xff\xfe.png"))
    out = tmp_path / "run"
    result = train("--data-path", data, "--output-dir", out, *FAST, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert torch.load(out / "best.pth", weights_only=True)["meta"]["classes"][2] == latin1

    csv_path = tmp_path / "p.csv"
    result = run_script("predict.py", data, "--weights", out / "best.pth", "--csv", csv_path)
    assert "Traceback" not in result.stderr and result.stdout.count("\n") == 18
    assert b"caf\xe9" in csv_path.read_bytes() and b"\xff\xfe.png" in csv_path.read_bytes()
    lines = run_script("predict.py", data, "--weights", out / "best.pth", "--json").stdout.splitlines()
    paths = [json.loads(line)["path"] for line in lines]
    assert sum(p.startswith(str(data / latin1)) for p in paths) == 6
    assert all(os.path.isfile(p) for p in paths)  # the escaped names decode to the files on disk


# ---- a failed run must not look like a success ------------------------------------------------

def test_batch_size_1_trains_and_is_refused_where_batchnorm_cannot(tiny_data, tmp_path):
    """--batch-size 1 makes one optimizer step per image (at 48 px the last feature maps are 2x2,
    enough for BatchNorm); at 32 px they are 1x1 and the flag is refused up front."""
    out = tmp_path / "run"
    run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST, "--img-size", "48",
               "--batch-size", "1", "--epochs", "1")
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["scheduler"]["last_epoch"] == 24  # 3 classes x 8 training images (32 px: see above)


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


def test_weights_with_nan_are_refused(tmp_path):
    """What predict.py and --weights read with: a file with a NaN is refused by name."""
    sd = train_script.create_model("b0", 3).state_dict()
    sd["features.top.0.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(errors.WeightsError, match="nan.pth holds NaN or infinite values"):
        model_files.load_model(str(tmp_path / "nan.pth"))


def flag_error(argv, capsys):
    """The one-line message train.py's parser and check_args give for `argv` (exit code 2)."""
    parser = train_script.get_args_parser()
    with pytest.raises(SystemExit) as exit_:
        train_script.check_args(parser, parser.parse_args(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, words", [
    (["--label-smoothing", "5"], ["--label-smoothing", "below 1"]),
    (["--seed", str(2**70)], ["--seed"]),
    (["--seed", "-1"], ["--seed"]),
    (["--lrf", "50"], ["--lrf", "between 0 and 1"]),
    (["--lr", "0"], ["--lr", "more than 0"]),
    (["--eval-only"], ["--eval-only", "--weights"]),
    (["--batch-size", "1", "--img-size", "32"], ["--batch-size 1", "--img-size"]),
    (["--ra-magnitude", "12"], ["--ra-magnitude", "--auto-augment ra"]),
    (["--auto-augment", "ra", "--ra-magnitude", "31"], ["--ra-magnitude", "0 and 30"]),
    (["--random-erase", "1.5"], ["--random-erase", "probability"]),
    (["--drop-path", "1"], ["--drop-path", "probability"]),
    (["--dropout", "-0.1"], ["--dropout", "probability"]),
    (["--mixup-alpha", "-1"], ["--mixup-alpha", ">= 0"]),
    (["--cutmix-alpha", "nan"], ["--cutmix-alpha"]),
    (["--precise-bn", "-5"], ["--precise-bn", "0 or more"]),
])
def test_out_of_range_flags_are_refused(flags, words, capsys):
    message = flag_error(flags, capsys)
    assert all(word in message for word in words), message


def test_a_device_that_cannot_train_is_refused():
    with pytest.raises(errors.UsageError, match="--device meta is not a device to train or predict on"):
        runtime.choose_device("meta")


# ---- exact resume -------------------------------------------------------------------------------

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


def test_augmentation_does_not_depend_on_the_worker():
    """The same (index, seed) gives the same crop whichever process loads it; another seed another."""
    paths = [os.path.join(ROOT, "data", "digits", "3", sorted(os.listdir(os.path.join(ROOT, "data", "digits", "3")))[0])]
    ds = my_dataset.MyDataSet(paths, [3], transform=transforms.build_transform(
        train_script.VARIANTS["b0"], 32, train=True, scale=(0.08, 1.0)))
    torch.manual_seed(1)
    a = ds[(0, 123)][0]
    torch.manual_seed(2)
    b = ds[(0, 123)][0]
    assert torch.equal(a, b) and not torch.equal(a, ds[(0, 124)][0])
    state = torch.get_rng_state()
    ds[(0, 5)]
    assert torch.equal(state, torch.get_rng_state())  # the model's RNG (dropout) is left alone


# ---- clean starts and stops ---------------------------------------------------------------------

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


def test_signal_while_drawing_the_final_plots(tiny_data, tmp_path):
    """Ctrl-C after the last epoch, while the last plots are drawn: the run is complete and says so."""
    result = interrupted_in("reports.plot_confusion", tmp_path, "--data-path", tiny_data, "--output-dir", tmp_path / "run",
                            *FAST, "--epochs", "1")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "the run is complete" in result.stderr
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1


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


def test_a_failed_start_leaves_no_run_folder(tiny_data, tmp_path):
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "nope.pth", cwd=tmp_path),
                      "nope.pth")
    assert not (tmp_path / "weights").exists()


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


# ---- outputs ------------------------------------------------------------------------------------

def test_predict_checks_its_output_paths_before_predicting(tiny_data, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(train_script.create_model("b0", 3).state_dict(), weights)
    result = run_script("predict.py", tiny_data, "--weights", weights, "--csv", tmp_path / "no" / "p.csv", check=False)
    assert_user_error(result, "--csv", "does not exist")
    assert result.stdout == ""  # nothing was predicted first
    with pytest.raises(errors.UsageError, match="--plot .* is a folder"):
        outputs.check_output_file(str(tmp_path), "--plot")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644)])
def test_output_files_honour_the_umask(tiny_data, tmp_path, umask, mode):
    out = tmp_path / "run"
    cmd = f"umask {umask:03o} && {sys.executable} {os.path.join(ROOT, 'train.py')} --data-path {tiny_data} " \
          f"--output-dir {out} " + " ".join(FAST) + " --epochs 1"
    subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, timeout=300)
    for name in ("best.pth", "last.pth", "metrics.csv", "curves.png", "class_indices.json"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == mode, name


def test_warnings_are_one_line_messages_naming_the_file(tmp_path):
    """A JPEG truncated after its header (it passes the scan, then fails to decode in training) and
    a PNG just over Pillow's pixel limit in predict.py: each is named in one line of this repo's,
    with no Python warning and no line of library code under it."""
    data = tmp_path / "data"
    copy_digits(data, classes=("0", "1"), per_class=6)
    write_truncated_jpeg(data / "0" / "cut.jpg")
    result = train("--data-path", data, "--output-dir", tmp_path / "run", *FAST, "--epochs", "1",
                   "--batch-size", "16")  # one batch of all 11 training images: cut.jpg is in it
    assert result.returncode == 0, result.stderr
    assert "warning: skipping unreadable image" in result.stderr and "cut.jpg" in result.stderr
    assert "Warning" not in result.stderr and "warn(" not in result.stderr, result.stderr

    photos = tmp_path / "photos"
    copy_digits(photos, classes=("2",), per_class=2)
    write_bomb_png(photos / "big.png", side=9500)  # 90 megapixels: Pillow warns, it does not refuse
    result = run_script("predict.py", photos, "--weights", tmp_path / "run" / "best.pth", check=False)
    assert result.returncode == 1 and "big.png: error:" in result.stderr and "pixels" in result.stderr
    assert "Warning" not in result.stderr and "warn(" not in result.stderr, result.stderr
    assert result.stdout.count("\n") == 2  # the two good images
