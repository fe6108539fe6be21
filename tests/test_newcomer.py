"""What a new user meets first: install problems said in one line, hints for the tutorial's habits,
progress that shows on any terminal, plots that say what they mean, run folders without litter."""
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
import errors
import model_files
import pretrained
import reports
import train
import utils
from errors import WeightsError
from conftest import FAST, ROOT
from inference import fuse_bn
from model import create_model


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


def test_the_tutorials_num_classes_flag_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as stop:
        train.get_args_parser().parse_args(["--num_classes", "5"])
    assert stop.value.code == 2
    assert "the class count comes from the class folders" in capsys.readouterr().err


def test_a_missing_flower_photos_folder_points_to_the_data_readme(tmp_path):
    with pytest.raises(errors.DataError, match="data/README.md says where to get it"):
        utils.read_split_data(str(tmp_path / "data" / "flower_photos"))
    with pytest.raises(errors.DataError) as other:
        utils.read_split_data(str(tmp_path / "my_data"))
    assert "README" not in str(other.value)


def test_a_missing_torchvision_file_points_to_the_download_by_name(tmp_path):
    with pytest.raises(WeightsError, match="--weights imagenet --model b3 downloads it"):
        pretrained.resolve(str(tmp_path / "efficientnet_b3_rwightman-b3899882.pth"), "b0")
    with pytest.raises(WeightsError, match="check the --weights path"):
        pretrained.resolve(str(tmp_path / "mine.pth"), "b0")


def test_predicting_from_last_pth_uses_its_averaged_weights(tiny_run):
    """last.pth holds the raw training weights and the EMA that validation scored; predict.py takes
    the EMA (the weights best.pth saves), not the raw ones."""
    _, run, _ = tiny_run
    ckpt = torch.load(run / "last.pth", weights_only=True)
    model, info, _, _ = model_files.load_model(run / "last.pth")
    assert info["ema"] is True
    x = torch.randn(2, 3, 32, 32)

    def logits(state):
        m = create_model("b0", 3)
        m.load_state_dict(state)
        return fuse_bn(m)(x)

    ema = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    with torch.inference_mode():
        got = model(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, logits(ema), rtol=1e-4, atol=1e-3)
        assert not torch.allclose(got, logits(ckpt["model"]), rtol=1e-2, atol=1e-2)
    _, best_info, _, _ = model_files.load_model(run / "best.pth")
    assert best_info["ema"] is False


def test_a_finished_run_leaves_no_lock_file_and_says_how_to_predict(tiny_run):
    _, run, stdout = tiny_run
    assert not (run / ".lock").exists()
    assert f"predict with: python predict.py IMAGES --weights {run / 'best.pth'}" in stdout


def history(top1, top5):
    return [{"epoch": e, "lr": 1e-3, "train_loss": 1.0, "val_loss": 0.5, "val_top1": a, "val_top5": b}
            for e, (a, b) in enumerate(zip(top1, top5), 1)]


def drawn_curves(monkeypatch, tmp_path, rows, num_classes):
    """plot_curves' figure, kept instead of closed, and the PNG it wrote."""
    figures = []
    real = reports.save_figure
    monkeypatch.setattr(reports, "save_figure", lambda fig, path: (figures.append(fig), real(fig, path)))
    reports.plot_curves(rows, tmp_path / "curves.png", num_classes)
    assert (tmp_path / "curves.png").stat().st_size > 0
    return figures[0]


def test_curves_show_top5_only_where_it_says_something_and_zoom_on_accuracy(monkeypatch, tmp_path):
    fig = drawn_curves(monkeypatch, tmp_path, history([0.90, 0.95, 0.97], [1.0, 1.0, 1.0]), 10)
    accuracy = fig.axes[1]
    assert [line.get_label() for line in accuracy.lines if not line.get_label().startswith(("_", "best"))] == ["top-1"]
    low, high = accuracy.get_ylim()
    assert 0.8 <= low <= 0.88 and high > 0.97  # not 0 to 1: the part that matters fills the axis
    assert "label-smoothed" in fig.axes[0].get_title()

    fig = drawn_curves(monkeypatch, tmp_path, history([0.2, 0.5, 0.7], [0.6, 0.9, 0.99]), 10)
    accuracy = fig.axes[1]
    assert "top-5" in [line.get_label() for line in accuracy.lines]
    assert accuracy.get_ylim()[0] <= 0.2


def test_predict_on_a_folder_without_images_says_so(tmp_path):
    import predict
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    paths, problems = predict.expand_paths([str(tmp_path / "empty"), str(tmp_path / "gone")])
    assert paths == []
    assert problems[0][0] == str(tmp_path / "empty") and problems[0][1].startswith("no images in this folder")
    assert ".jpg" in problems[0][1] and ".png" in problems[0][1]
    assert problems[1] == (str(tmp_path / "gone"), "no such file")
