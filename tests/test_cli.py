"""Flags and messages common to the scripts: refusals, hints, --help, progress, warnings, installs."""
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch

import cli
import train as train_script
from conftest import (FAST, ROOT, assert_user_error, copy_digits, run_script, train,
                      write_bomb_png, write_truncated_jpeg)


# ---- flags ------------------------------------------------------------------------------------

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


def test_img_size_is_capped_before_anything_is_made(capsys):
    message = flag_error(["--img-size", "30000"], capsys)
    assert "--img-size" in message and "at most 1024" in message


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], ["--epochs", "at least 1"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--img-size", "8"], ["--img-size", "at least 32"]),
    (["--model", "b9"], ["--model", "invalid choice"]),
])
def test_nonsense_numbers_and_names(tiny_data, flags, words):
    assert_user_error(train("--data-path", tiny_data, *FAST, *flags), *words)


@pytest.mark.parametrize("script, argv, suggestion", [
    ("train", ["--epoch", "3"], "--epochs"),
    ("train", ["--img_size", "64"], "--img-size"),
    ("predict", ["photo.jpg", "--weight", "x.pth"], "--weights"),
    ("predict", ["photo.jpg", "--top-k", "3"], "--topk"),
    ("train", ["--early-stopping", "5"], "--patience"),
    ("train", ["--pretrained"], "--weights"),
    ("train", ["--num_workers", "4"], "--workers"),
])
def test_typos_in_flags_are_not_taken_for_other_flags(script, argv, suggestion, capsys):
    """No abbreviations (--epoch is not --epochs), and the close flag is suggested."""
    import predict
    import train
    parser = {"train": train, "predict": predict}[script].get_args_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 2
    assert f"(did you mean {suggestion}?)" in capsys.readouterr().err


def test_the_tutorials_num_classes_flag_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as stop:
        train_script.get_args_parser().parse_args(["--num_classes", "5"])
    assert stop.value.code == 2
    assert "the class count comes from the class folders" in capsys.readouterr().err


def help_entries(text):
    """{flag: its help text} from --help output."""
    entries, flag = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("     "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def test_help_gives_each_default_once():
    """Every flag's help names its default at most once, and the flags come in groups."""
    import train
    text = train.get_args_parser().format_help()
    entries = help_entries(text)
    assert len(entries) > 30
    doubled = [flag for flag, entry in entries.items() if entry.count("default") > 1]
    assert doubled == []
    for flag in ("--img-size", "--lr", "--weight-decay", "--epochs"):
        assert entries[flag].count("default") == 1, entries[flag]
    assert all(group in text for group in ("data:", "model:", "optimisation:", "augmentation:", "run:"))


def test_usage_and_help_say_what_is_required_and_every_default():
    """predict.py's usage shows --weights as required, as its help says; train.py's --weights says
    that without it training starts from scratch, and a flag whose default is "none" says so."""
    import predict
    import train
    assert " PATH [PATH ...] --weights FILE|imagenet [--topk N]" in predict.get_args_parser().format_usage()
    entries = help_entries(train.get_args_parser().format_help())
    assert "(default: none, training from scratch)" in entries["--weights"]
    assert "(default: none)" in entries["--auto-augment"]
    valued = [a.option_strings[0] for a in train.get_args_parser()._actions if a.option_strings and a.nargs != 0
              and a.option_strings[0] != "--resume"]  # --resume [FILE]: without it, no resume
    assert len(valued) > 30 and [flag for flag in valued if "default" not in entries[flag]] == []


# ---- what the scripts print: progress, warnings, a torchvision that does not fit --------------

def terminal_of_width(columns):
    """A real pseudo-terminal that reports `columns` columns, as stderr."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return leader, os.fdopen(follower, "w")


@pytest.mark.parametrize("columns, bars", [(0, False), (80, True)])
def test_progress_bars_only_where_the_terminal_has_a_width(monkeypatch, columns, bars):
    """A terminal of 0 columns (script without a tty, some containers) gets the log lines, not empty bars."""
    leader, stream = terminal_of_width(columns)
    try:
        monkeypatch.setattr(sys, "stderr", stream)
        assert cli.progress_bars() is bars
    finally:
        stream.close()
        os.close(leader)


def test_progress_bars_not_in_a_pipe_or_file(monkeypatch, tmp_path):
    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        assert cli.progress_bars() is False


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


def test_a_torchvision_that_does_not_fit_torch_is_one_line_before_any_folder_is_made(tiny_data, tmp_path):
    """A torchvision built for another torch fails at import with "operator torchvision::nms does not
    exist"; train.py says which versions it found and how to install a matching pair."""
    fake = tmp_path / "site"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    (fake / "torchvision-0.99.0.dist-info").mkdir()
    (fake / "torchvision-0.99.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data-path", tiny_data,
                             "--output-dir", run, *FAST], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line, = result.stderr.strip().splitlines()
    assert "torchvision 0.99.0 does not work with torch" in line and "nms" in line
    release = torch.__version__.split("+")[0]
    minor = int(release.split(".")[1])
    assert f"torch=={release}" in line and f"torchvision==0.{minor + 15}.*" in line
    assert not run.exists()
