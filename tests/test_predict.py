"""predict.py as a user runs it: on train.py's checkpoints and on raw torchvision / tutorial files,
with --tta and --cam, over folders and globs, and with names that would drive the terminal."""
import csv
import json
import os
import shutil
import time

import matplotlib
import pytest
import torch
import torchvision
from PIL import Image

import checkpoint
import cli
import model as M
import model_files
import predict
import reports
import utils
from conftest import copy_digits, run_script, sigterm_then_kill_workers
from inference import fuse_bn
from model import create_model

PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


@pytest.fixture
def trained(tiny_run):
    """A real train.py run on a tiny digits folder: (data folder, run folder)."""
    return tiny_run[:2]


def predict_json(*args, check=True):
    result = run_script("predict.py", *args, "--json", check=check)
    return [json.loads(line) for line in result.stdout.splitlines()], result


def test_json_lines_from_a_train_checkpoint(trained):
    """One JSON object per image with index, class and probability, top-k sorted."""
    data, run = trained
    lines, _ = predict_json(os.path.join(data, "1"), "--weights", run / "best.pth", "--topk", "3")
    assert [r["path"] for r in lines] == sorted(os.path.join(data, "1", f) for f in os.listdir(os.path.join(data, "1")))
    for r in lines:
        assert set(r) == {"path", "topk"} and len(r["topk"]) == 3
        assert {t["class"] for t in r["topk"]} == {"0", "1", "2"}
        assert all(t["class"] == str(t["index"]) for t in r["topk"])
        probs = [t["prob"] for t in r["topk"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)


def test_predict_reproduces_train_val_top1(trained):
    """predict.py over the validation split gives exactly the val top-1 train.py saved in best.pth."""
    data, run = trained
    best = torch.load(run / "best.pth", weights_only=True)
    split = utils.read_split_data(data, best["meta"]["args"]["val_rate"], best["meta"]["args"]["seed"])
    lines, _ = predict_json(*split.val_images, "--weights", run / "best.pth")
    truth = dict(zip(split.val_images, split.val_labels))
    correct = sum(r["topk"][0]["index"] == truth[r["path"]] for r in lines)
    assert len(lines) == len(split.val_images)
    assert correct / len(lines) == pytest.approx(best["val_top1"], abs=1e-9)


def test_torchvision_file_matches_torchvision(tmp_path):
    """A raw torchvision state_dict: ImageNet names, torchvision's own eval transform, and the
    same top-5 classes and probabilities as torchvision's model on a real photo."""
    torch.manual_seed(0)
    tv = torchvision.models.efficientnet_b0().eval()
    with torch.no_grad():  # random BN statistics and a sharper head, so the top-5 is meaningful
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        tv.classifier[1].weight.mul_(300)
    path = tmp_path / "efficientnet_b0_rwightman-7f5810bc.pth"
    torch.save(tv.state_dict(), path)
    weights = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1
    with torch.no_grad():
        x = weights.transforms()(Image.open(PHOTO).convert("RGB"))[None]
        expected = tv(x).softmax(1)[0].topk(5)
    lines, _ = predict_json(PHOTO, "--weights", path, "--topk", "5")
    got = lines[0]["topk"]
    assert [t["index"] for t in got] == expected.indices.tolist()
    assert [t["class"] for t in got] == [weights.meta["categories"][i] for i in expected.indices]
    assert [t["prob"] for t in got] == pytest.approx(expected.values.tolist(), abs=1e-3)
    assert expected.values[0] > 0.05  # the comparison is not between near-uniform outputs


def test_tutorial_file_takes_class_names_from_beside_it(tmp_path):
    """A tutorial-format state_dict with class_indices.json next to it, as the tutorial leaves them."""
    model = M.efficientnet_b0(num_classes=3)
    torch.save(model.state_dict(), tmp_path / "model-29.pth")
    (tmp_path / "class_indices.json").write_text(json.dumps({"0": "daisy", "1": "roses", "2": "tulips"}))
    lines, _ = predict_json(PHOTO, "--weights", tmp_path / "model-29.pth")
    assert lines[0]["topk"][0]["class"] in {"daisy", "roses", "tulips"}


def test_folders_globs_broken_and_missing(trained, tmp_path):
    """Folders recurse, globs expand, each bad input gets its own error line, and the exit code
    says some failed; the good images are still predicted."""
    data, run = trained
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(os.path.join(data, "0", os.listdir(os.path.join(data, "0"))[0]), folder / "nested" / "a.png")
    shutil.copy(PHOTO, folder / "b.jpg")
    (folder / "broken.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    lines, result = predict_json(folder, str(tmp_path / "imgs" / "*.jpg"), tmp_path / "missing.png",
                                 "--weights", run / "best.pth", check=False)
    assert result.returncode == 1
    by_path = {r["path"]: r for r in lines}
    assert "error" in by_path[str(tmp_path / "missing.png")]
    assert "error" in by_path[str(folder / "broken.jpg")]
    assert "topk" in by_path[str(folder / "nested" / "a.png")] and "topk" in by_path[str(folder / "b.jpg")]
    assert len(lines) == 4  # b.jpg and broken.jpg match both the folder and the glob: once each


def test_csv_and_plot_outputs(trained, tmp_path):
    """--csv writes one row per image; --plot writes a PNG grid (looked at by eye once)."""
    data, run = trained
    result = run_script("predict.py", os.path.join(data, "2"), "--weights", run / "best.pth",
                        "--csv", tmp_path / "p.csv", "--plot", tmp_path / "p.png", "--topk", "2")
    assert result.stdout.count("  1. ") == 10
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "path,class1,prob1,class2,prob2,error" and len(rows) == 11
    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG" and img.width > 500


def test_a_folder_run_ends_with_a_summary_and_names_what_it_wrote(trained, tmp_path):
    data, run = trained
    out = run_script("predict.py", data, "--weights", run / "best.pth", "--csv", tmp_path / "p.csv",
                     "--plot", tmp_path / "p.png", "--plot-limit", "4")
    n = len(out.stdout.splitlines())
    lines = out.stderr.strip().splitlines()
    assert lines[-2].startswith(f"{n} inputs: {n} predicted as ")
    assert lines[-1] == f"wrote {tmp_path / 'p.csv'} ({n} rows), {tmp_path / 'p.png'} (first 4 of {n} images)"


def test_missing_weights_names_the_newest_run(tmp_path):
    for name in ("b0-old", "b0-new"):
        (tmp_path / "weights" / name).mkdir(parents=True)
        (tmp_path / "weights" / name / "best.pth").write_bytes(b"x")
        time.sleep(0.05)
    result = run_script("predict.py", "photo.jpg", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert os.path.join("weights", "b0-new", "best.pth") in result.stderr.splitlines()[-1]


def test_results_are_not_kept_for_the_end():
    """Over a folder of any size the run keeps counts and the images it will draw, not every result."""
    import predict
    tally = predict.Tally(keep=4)
    for i in range(1000):
        tally.add({"path": f"{i}.jpg", "topk": [{"index": i % 3, "class": "abc"[i % 3], "prob": 0.9}]}
                  if i % 10 else {"path": f"{i}.jpg", "error": "cannot read image"})
    assert len(tally.shown) == 4 and tally.total == 1000 and tally.failed == 100
    assert tally.summary() == "1000 inputs: 900 predicted as 3 classes (b: 300, c: 300, a: 300), 100 could not be read"


def test_a_terminal_shows_progress_and_time_left(trained):
    """On a terminal a run over many images shows a progress bar with the time left, between the results."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios
    data, run = trained
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 rows, 120 columns
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "predict.py"),
                             data, "--weights", str(run / "best.pth"), "--batch-size", "4", "--workers", "0"],
                            stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the process has ended
            break
        if not chunk:
            break
        output += chunk
    proc.wait()
    os.close(master)
    text = output.decode()
    assert proc.returncode == 0 and "predict:" in text and "img/s]" in text and "<" in text
    assert text.count(": 0 (") + text.count(": 1 (") + text.count(": 2 (") == 30  # every result still shown


def test_a_script_run_in_the_test_process_answers_as_in_its_own(trained, tmp_path):
    """conftest.run_script runs the scripts in the test process (runpy) to save an import of torch
    per run: a success and a user's mistake give the same exit code, stdout and stderr there as in
    a process of their own."""
    _, run = trained
    for args in ([PHOTO, "--weights", run / "best.pth", "--topk", "2"],
                 [PHOTO, "--weights", tmp_path / "missing.pth"]):
        inside, own = run_script("predict.py", *args, check=False), run_script("predict.py", *args, check=False,
                                                                             process=True)
        assert (inside.returncode, inside.stdout, inside.stderr) == (own.returncode, own.stdout, own.stderr)
    assert own.returncode == 2 and own.stderr.startswith("error: weights file not found")


def test_the_summary_says_how_the_model_ran(trained):
    """The last line over many images names the precision and the path: fp32 through CPUInference
    (fused oneDNN convs) by default, bf16 autocast with --amp (ONNX Runtime or the exported
    program for an exported file: tests/test_export.py)."""
    data, run = trained
    for flags, how in (([], "; fp32, fused oneDNN convs"), (["--amp"], "; bf16 autocast (--amp)")):
        err = run_script("predict.py", data, "--weights", run / "best.pth", *flags).stderr
        assert err.splitlines()[-1].startswith("30 inputs: 30 predicted") and err.rstrip().endswith(how), err


def test_a_worker_dying_after_the_signal_does_not_change_the_stop(trained):
    """SIGTERM, then a loader worker dying (one still starting when the signal reached the whole
    group): the stop stays a stop, "interrupted" and exit 130, not a worker error with a traceback."""
    import subprocess
    import sys
    _, run = trained
    digits = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "digits")  # 1,797 images
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "predict.py"),
                             digits, "--weights", str(run / "best.pth"), "--batch-size", "4", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the first answer: the workers are at work
    sigterm_then_kill_workers(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err


# ---- last.pth, folders, globs and the plot ----------------------------------------------------

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


def test_predict_on_a_folder_without_images_says_so(tmp_path):
    import predict
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    paths, problems = predict.expand_paths([str(tmp_path / "empty"), str(tmp_path / "gone")])
    assert paths == []
    assert problems[0][0] == str(tmp_path / "empty") and problems[0][1].startswith("no images in this folder")
    assert ".jpg" in problems[0][1] and ".png" in problems[0][1]
    assert problems[1] == (str(tmp_path / "gone"), "no such file")


def test_a_glob_that_matches_folders_searches_them(tmp_path):
    """Before: "data/digits/[01]" said "no file matches"."""
    copy_digits(tmp_path, classes=("0", "1", "2"), per_class=2)
    paths, problems = predict.expand_paths([str(tmp_path / "[01]")])
    assert problems == [] and sorted(os.path.basename(os.path.dirname(p)) for p in paths) == ["0", "0", "1", "1"]


def test_plot_limit_has_a_ceiling(capsys):
    """Before: --plot-limit 2400 drew for minutes into a PNG 53,438 px tall."""
    parser = predict.get_args_parser()
    predict.check_args(parser, parser.parse_args(["x", "--plot-limit", "256"]))
    with pytest.raises(SystemExit) as exit:
        predict.check_args(parser, parser.parse_args(["x", "--plot-limit", "2400"]))
    assert exit.value.code == 2 and "--plot-limit is at most 256 (got 2400)" in capsys.readouterr().err


# ---- test-time augmentation and Grad-CAM ------------------------------------------------------

def test_tta_is_the_mean_over_the_image_and_its_mirror(tiny_run, tmp_path):
    """predict.py --tta gives the mean of the probabilities of the image as the model sees it and of
    its mirror image, and is left off, with a note, for a model trained with --no-hflip."""
    data, run, _ = tiny_run
    source = os.path.join(data, "2", sorted(os.listdir(os.path.join(data, "2")))[0])
    image = Image.open(source).convert("RGB").resize((48, 40))
    image.save(tmp_path / "a.png")
    model, _, transform, _ = model_files.load_model(run / "best.pth")
    x = transform.normalize(transform(image)[None])
    with torch.no_grad():
        expected = ((model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2)[0]
        plain = model(x).softmax(1)[0]
    out = run_script("predict.py", tmp_path / "a.png", "--weights", run / "best.pth", "--topk", "3", "--json", "--tta")
    got = {t["index"]: t["prob"] for t in json.loads(out.stdout)["topk"]}
    assert got == pytest.approx({c: expected[c].item() for c in range(3)}, abs=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # the mirror made a difference

    ckpt = torch.load(run / "best.pth", weights_only=True)
    ckpt["meta"]["args"]["no_hflip"] = True
    checkpoint.save(ckpt, tmp_path / "no_hflip.pth")
    result = run_script("predict.py", tmp_path / "a.png", "--weights", tmp_path / "no_hflip.pth", "--tta")
    assert "--tta left off" in result.stderr and "--no-hflip" in result.stderr


class BrightnessNet(torch.nn.Module):
    """A network whose answer is known: class 0's logit is the mean brightness of the image, class
    1's its negative. features[-1] is the map Grad-CAM reads."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1), torch.nn.ReLU())
        self.head = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 3)
            self.features[0].bias.zero_()
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_grad_cam_finds_the_bright_square():
    """The map of the class that looks for brightness peaks inside the bright square and is zero
    far from it; the class that brightness argues against gets no positive evidence anywhere."""
    x = torch.zeros(1, 3, 40, 40)
    x[:, :, 5:15, 22:34] = 1.0
    cam, logits, target = predict.grad_cam(BrightnessNet(), x)
    assert target == 0 and logits[0] > logits[1]
    peak = divmod(int(cam.argmax()), cam.shape[1])
    assert 5 <= peak[0] < 15 and 22 <= peak[1] < 34
    assert cam.max() == 1 and cam[30:, :20].abs().max() == 0
    against, _, target = predict.grad_cam(BrightnessNet(), x, target=1)
    assert target == 1 and against.abs().max() == 0


def test_cam_maps_for_a_torchvision_file_and_for_a_named_class(tiny_run, tmp_path):
    """--cam writes one PNG per image (ImageNet names for torchvision's own file), images with the
    same file name in two folders each get their own; --cam-class draws another class's map;
    an unknown class or a file in place of the folder is one line and exit 2."""
    data, run, _ = tiny_run
    torch.manual_seed(0)
    torch.save(torchvision.models.efficientnet_b0().state_dict(), tmp_path / "b0.pth")
    first = os.path.join(data, "0", sorted(os.listdir(os.path.join(data, "0")))[0])
    same_name = tmp_path / "other" / os.path.basename(first)
    same_name.parent.mkdir()
    Image.open(first).convert("RGB").rotate(90).save(same_name)
    result = run_script("predict.py", first, same_name, "--weights", tmp_path / "b0.pth", "--cam", tmp_path / "cams")
    stem = os.path.splitext(os.path.basename(first))[0]
    assert sorted(os.listdir(tmp_path / "cams")) == [f"{stem}_cam-2.png", f"{stem}_cam.png"]
    assert "2 class-activation maps to" in result.stderr
    with Image.open(tmp_path / "cams" / f"{stem}_cam.png") as img:
        assert img.format == "PNG" and img.width > 400

    result = run_script("predict.py", first, "--weights", run / "best.pth", "--cam", tmp_path / "named",
                        "--cam-class", "2")
    assert os.listdir(tmp_path / "named") == [f"{stem}_cam.png"]
    for flags, words in ((["--cam", tmp_path / "named", "--cam-class", "twelve"], "--cam-class twelve is not a class"),
                         (["--cam", tmp_path / "b0.pth"], "is a file")):
        bad = run_script("predict.py", first, "--weights", run / "best.pth", *flags, check=False)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


# ---- names on the terminal and in CSV -----------------------------------------------------------

def test_control_characters_in_names_are_escaped_on_the_terminal():
    """A file name that would retitle the terminal and print a fake result line of its own, a
    class name with a carriage return. Before: printed raw."""
    assert cli.printable("a\x1b[2Jb\nc\rd\x85e\x7f\udcff") == "a\\x1b[2Jb\\nc\\rd\\x85e\\x7f\\xff"
    lines = []

    def say(text, file=None):
        lines.append(text)

    args = predict.get_args_parser().parse_args(["x", "--weights", "w"])
    predict.show({"path": "x\x1b]0;owned\x07.png\nfake.png: cat (1.000)",
                  "topk": [{"index": 0, "class": "dog\r", "prob": 0.9}]}, args, say)
    predict.show({"path": "y\n.png", "error": "cannot read image: y\n.png"}, args, say)
    assert lines == ["x\\x1b]0;owned\\x07.png\\nfake.png: cat (1.000): dog\\r (0.900)",
                     "y\\n.png: error: cannot read image: y\\n.png"]
    args = predict.get_args_parser().parse_args(["x", "--weights", "w", "--json"])
    predict.show({"path": "x\n.png", "topk": [{"index": 0, "class": "dog\r", "prob": 0.9}]}, args, say)
    assert json.loads(lines[-1])["path"] == "x\n.png"  # --json keeps the exact name


def test_a_carriage_return_in_a_name_is_quoted_in_csv(tmp_path):
    """Before: "a\\rb" went out unquoted and readers saw two rows."""
    row = predict.csv_row({"path": "a\rb.png", "topk": [{"class": "c\rd", "prob": 0.5}]}, 1)
    (tmp_path / "p.csv").write_text(predict.csv_header(1) + row, newline="")
    with open(tmp_path / "p.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == [["a\rb.png", "c\rd", "0.5", ""]]
    assert reports.csv_field("x\ry") == '"x\ry"'
