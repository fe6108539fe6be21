"""What the model learned: predictions.csv and mistakes.png after training and --eval-only,
Grad-CAM maps from predict.py --cam, and test-time augmentation (--tta)."""
import csv
import json
import os

import pytest
import torch
import torchvision
from PIL import Image

import checkpoint
import model_files
import predict
from conftest import FAST, run_script


@pytest.fixture
def trained(tiny_run):
    """A real train.py run on a tiny digits folder: (data folder, run folder, its stdout)."""
    return tiny_run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_predictions(rows, top1):
    """Every validation image once, its class folder as the true class, right where predicted = true."""
    assert list(rows[0]) == ["path", "true", "predicted", "prob", "prob_true", "correct"]
    assert len(rows) == len({r["path"] for r in rows}) == 6  # 2 of each class's 10 images
    for r in rows:
        assert r["true"] == os.path.basename(os.path.dirname(r["path"])) and os.path.isfile(r["path"])
        assert int(r["correct"]) == (r["true"] == r["predicted"])
        assert 0 < float(r["prob_true"]) <= float(r["prob"]) <= 1
        assert (float(r["prob_true"]) == float(r["prob"])) >= bool(int(r["correct"]))
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(top1, abs=1e-4)  # top1 as printed


def test_training_ends_with_predictions_and_mistakes(trained):
    """predictions.csv holds the best epoch's prediction for every validation image (its accuracy is
    best.pth's); mistakes.png shows the wrong ones, or the run says that there are none."""
    _, run, stdout = trained
    best = torch.load(run / "best.pth", weights_only=True)
    rows = read_csv(run / "predictions.csv")
    check_predictions(rows, best["val_top1"])
    if all(int(r["correct"]) for r in rows):
        assert "no mistakes: all 6 validation images right" in stdout and not (run / "mistakes.png").exists()
    else:
        wrong = sum(not int(r["correct"]) for r in rows)
        assert f"mistakes.png: all {wrong} wrong validation images" in stdout
        with Image.open(run / "mistakes.png") as img:
            assert img.format == "PNG" and img.width > 150
    assert torch.load(run / "last.pth", weights_only=True)["best_predictions"]["index"].tolist() == list(range(6))


def test_eval_only_writes_predictions_where_asked_with_and_without_tta(trained, tmp_path):
    """--eval-only reports and writes predictions.csv (and mistakes.png) into --output-dir, leaving
    the run folder as it was; --tta evaluates each image with its mirror image and says so."""
    data, run, _ = trained
    before = {name: os.path.getmtime(run / name) for name in os.listdir(run)}
    plain = run_script("train.py", "--data-path", data, *FAST, "--weights", run / "best.pth", "--eval-only",
                       "--output-dir", tmp_path / "plain", cwd=tmp_path)
    top1 = float(plain.stdout.split("top-1 ")[1].split()[0])
    check_predictions(read_csv(tmp_path / "plain" / "predictions.csv"), top1)
    tta = run_script("train.py", "--data-path", data, *FAST, "--weights", run / "best.pth", "--eval-only", "--tta",
                     "--output-dir", tmp_path / "tta", cwd=tmp_path)
    assert "(--tta: with their mirror images)" in tta.stdout
    rows = read_csv(tmp_path / "tta" / "predictions.csv")
    check_predictions(rows, float(tta.stdout.split("top-1 ")[1].split()[0]))
    assert [r["prob"] for r in rows] != [r["prob"] for r in read_csv(tmp_path / "plain" / "predictions.csv")]
    assert {name: os.path.getmtime(run / name) for name in os.listdir(run)} == before
    assert not (tmp_path / "weights").exists()


def test_tta_is_the_mean_over_the_image_and_its_mirror(trained, tmp_path):
    """predict.py --tta gives the mean of the probabilities of the image as the model sees it and of
    its mirror image, and is left off, with a note, for a model trained with --no-hflip."""
    data, run, _ = trained
    source = os.path.join(data, "2", sorted(os.listdir(os.path.join(data, "2")))[0])
    image = Image.open(source).convert("RGB").resize((48, 40))
    image.save(tmp_path / "a.png")
    model, _, transform, _ = model_files.load_model(run / "best.pth")
    x = transform(image)[None]
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


def test_cam_maps_for_a_torchvision_file_and_for_a_named_class(trained, tmp_path):
    """--cam writes one PNG per image (ImageNet names for torchvision's own file), images with the
    same file name in two folders each get their own; --cam-class draws another class's map;
    an unknown class or a file in place of the folder is one line and exit 2."""
    data, run, _ = trained
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
