"""predict.py as a user runs it: on train.py's checkpoints and on raw torchvision / tutorial files."""
import json
import os
import shutil
import time

import matplotlib
import pytest
import torch
import torchvision
from PIL import Image

import model as M
import utils
from conftest import run_script, sigterm_then_kill_workers

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
