"""train.py as a user runs it, on a tiny real folder of digit images at 32 px: its outputs, which
epoch best.pth holds, --patience, TensorBoard, and what it says when the model learns nothing."""
import importlib.util
import json
import re

import pytest
import torch
import torchvision
from PIL import Image

import reports
import train as train_script
import utils
import weight_files
from conftest import FAST, check_predictions, metrics, read_csv, run_main, run_script


def test_run_writes_consistent_outputs(tiny_data, tmp_path):
    """A run leaves best/last checkpoints, metrics, plots and per-class stats that agree."""
    out = tmp_path / "run"
    result = run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST)
    assert "epoch 2/2" in result.stdout
    for name in ("best.pth", "last.pth", "metrics.csv", "curves.png", "confusion_matrix.png",
                 "per_class.csv", "class_indices.json", "class_distribution.png"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5",
                             "epoch_seconds", "data_time", "images_per_second", "data_wait"]
    # the epoch line names the share of the epoch spent waiting for data, as metrics.csv keeps it
    shares = re.findall(r"^epoch \d/2 .* img/s  data (\d+) %", result.stdout, re.M)
    assert shares == [f"{100 * float(r['data_wait']):.0f}" for r in rows], result.stdout
    for r in rows:
        assert 0 <= float(r["data_time"]) < float(r["epoch_seconds"])
        assert 0 <= float(r["val_top1"]) <= float(r["val_top5"]) <= 1
        assert float(r["val_top5"]) == 1.0  # 3 classes: top-5 is capped at top-3, always right
        assert float(r["images_per_second"]) > 0
    assert json.loads((out / "class_indices.json").read_text()) == {"0": "0", "1": "1", "2": "2"}

    best = torch.load(out / "best.pth", weights_only=True)
    assert best["meta"]["variant"] == "b0" and best["meta"]["classes"] == ["0", "1", "2"]
    assert best["meta"]["img_size"] == 32 and best["meta"]["args"]["epochs"] == 2
    assert best["val_top1"] == pytest.approx(max(float(r["val_top1"]) for r in rows), abs=1e-6)
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and len(last["history"]) == 2

    per_class = read_csv(out / "per_class.csv")
    assert [r["class"] for r in per_class] == ["0", "1", "2"]
    assert sum(int(r["support"]) for r in per_class) == 6  # 2 of each class's 10 images
    for name in ("curves.png", "confusion_matrix.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 300


def test_a_finished_run_leaves_no_lock_file_and_says_how_to_predict(tiny_run):
    _, run, stdout = tiny_run
    assert not (run / ".lock").exists()
    assert f"predict with: python predict.py IMAGES --weights {run / 'best.pth'}" in stdout


def test_training_ends_with_predictions_and_mistakes(tiny_run):
    """predictions.csv holds the best epoch's prediction for every validation image (its accuracy is
    best.pth's); mistakes.png shows the wrong ones, or the run says that there are none."""
    _, run, stdout = tiny_run
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


def test_batch_size_1_trains_and_is_refused_where_batchnorm_cannot(tiny_data, tmp_path):
    """--batch-size 1 makes one optimizer step per image (at 48 px the last feature maps are 2x2,
    enough for BatchNorm); at 32 px they are 1x1 and the flag is refused up front."""
    out = tmp_path / "run"
    run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST, "--img-size", "48",
               "--batch-size", "1", "--epochs", "1")
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["scheduler"]["last_epoch"] == 24  # 3 classes x 8 training images (32 px: see above)


def test_finetune_from_torchvision_file_with_other_class_count(tiny_data, tmp_path):
    """A torchvision state_dict (1000 classes) fine-tunes on 3 classes: new head, backbone loaded."""
    torch.manual_seed(0)
    tv = torchvision.models.efficientnet_b0()
    path = tmp_path / "efficientnet_b0_tv.pth"
    torch.save(tv.state_dict(), path)
    out = tmp_path / "ft"
    result = run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST,
                        "--epochs", "1", "--weights", path, "--freeze-layers")
    assert "1000-class head" in result.stdout
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["model"]["classifier.1.weight"].shape == (3, 1280)
    assert best["meta"]["bn_eps"] == pytest.approx(1e-5)  # torchvision's B0 BatchNorm eps is kept

    # --freeze-layers: everything before features.top is exactly the file's, running stats included
    source, _ = weight_files.read_weights(str(path))
    trained = best["model"]
    frozen = [k for k in source if not k.startswith(("features.top.", "classifier."))]
    assert len(frozen) > 200
    changed = [k for k in frozen if not torch.equal(source[k], trained[k])]
    assert changed == []
    assert not torch.equal(source["features.top.0.weight"], trained["features.top.0.weight"])


def test_ema_weights_are_saved_and_resume(tiny_data, tmp_path):
    """With --ema the averaged weights are what best.pth holds; the average resumes too."""
    out = tmp_path / "ema"
    run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST, "--epochs", "1", "--ema")
    last = torch.load(out / "last.pth", weights_only=True)
    best = torch.load(out / "best.pth", weights_only=True)
    ema = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    assert best["model"].keys() == ema.keys()
    assert all(torch.equal(best["model"][k], ema[k]) for k in ema)
    assert not torch.equal(best["model"]["classifier.1.weight"], last["model"]["classifier.1.weight"])
    run_script("train.py", "--resume", out / "last.pth", "--epochs", "2")
    resumed = torch.load(out / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["ema"]["n_averaged"] == 2 * last["ema"]["n_averaged"]


# ---- what a newcomer sees ---------------------------------------------------------------------

def test_not_learning_is_said_with_what_to_try():
    """learning_problem: a healthy confusion matrix says nothing; one class taking all predictions,
    or top-1 no better than the largest class, is named."""
    import reports
    classes = ["cat", "dog", "fox"]
    healthy = torch.tensor([[8, 1, 1], [1, 9, 0], [0, 2, 8]])
    assert reports.learning_problem(healthy, classes) is None
    one_class = torch.tensor([[10, 0, 0], [10, 0, 0], [9, 0, 1]])
    assert "29 of 30 validation images are predicted as 'cat'" in reports.learning_problem(one_class, classes)
    chance = torch.tensor([[4, 3, 3], [4, 3, 3], [3, 4, 3]])  # top-1 0.33, as guessing
    assert "no better than always answering the largest class" in reports.learning_problem(chance, classes)


def test_a_run_that_learned_nothing_says_so(tiny_data, tmp_path):
    """Two epochs at 32 px with the recipe of earlier versions (no precise BatchNorm, no EMA,
    stochastic depth), which sits at chance for its first epochs, learn nothing on 3 classes: the
    run still succeeds, but says so with advice; in a log file (no terminal) progress lines come
    between the epoch lines, and each epoch line gives the time the whole run has left."""
    result = run_script("train.py", "--data-path", tiny_data, "--output-dir", tmp_path / "run", *FAST,
                        "--log-interval", "0", "--precise-bn", "0", "--no-ema", "--drop-path", "0.2")
    assert "epoch 1  step 1/3  loss" in result.stderr and "epoch ends in" in result.stderr
    assert "run ends in" in result.stdout.split("epoch 1/2")[1].splitlines()[0]
    assert "top-5" not in result.stdout  # 3 classes: top-5 is always 1.0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("warning: the model has not learned to tell the classes apart")
    assert "--epochs" in last and "--weights" in last and "--lr" in last


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


# ---- which epoch best.pth holds and when a run ends -------------------------------------------

def scripted_validation(monkeypatch, figures):
    """utils.evaluate gives epoch n the (top-1, loss) figures[n - 1], on its real confusion matrix
    and predictions: the rule that picks best.pth sees exactly these."""
    evaluate, calls = utils.evaluate, []

    def scripted(*args, **kwargs):
        top1, loss = figures[len(calls)]
        calls.append(1)
        return dict(evaluate(*args, **kwargs), val_top1=top1, val_loss=loss)
    monkeypatch.setattr(utils, "evaluate", scripted)


def test_among_epochs_of_equal_top1_best_pth_is_the_lowest_loss(tiny_data, tmp_path, monkeypatch, capsys):
    """On a small validation set top-1 stays equal for epochs while the loss goes on falling:
    best.pth is the highest top-1 and, among the epochs that reach it, the lowest val loss (epoch
    3 here, not epoch 2 that reached it first, nor epoch 5 whose loss is lower but top-1 too), and
    the run's last line says which epoch it holds and why."""
    scripted_validation(monkeypatch, [(0.5, 0.5), (0.6, 0.9), (0.6, 0.7), (0.6, 0.8), (0.5, 0.1)])
    run = tmp_path / "run"
    assert run_main("--data-path", tiny_data, "--output-dir", run, *FAST[:-1], "5") == 0
    out = capsys.readouterr().out
    best, last = (torch.load(run / name, weights_only=True) for name in ("best.pth", "last.pth"))
    assert (best["epoch"], best["val_top1"], last["best_epoch"]) == (3, 0.6, 3)
    assert f"{run / 'best.pth'} holds epoch 3: 3 epochs reached that top-1, and its val loss was the lowest of " \
           "them (0.7000)" in out.splitlines()[-2]


def test_the_only_epoch_at_the_best_top1_is_named(tiny_data, tmp_path, monkeypatch, capsys):
    scripted_validation(monkeypatch, [(0.4, 0.5), (0.7, 0.9)])
    run = tmp_path / "run"
    assert run_main("--data-path", tiny_data, "--output-dir", run, *FAST) == 0
    assert "done: best val top-1 0.7000; " + str(run / "best.pth") + " holds epoch 2, the one with that top-1" \
        in capsys.readouterr().out


def test_patience_stops_the_run_and_resume_goes_on_from_its_count(tiny_data, tmp_path, monkeypatch, capsys):
    """--patience 2 with no better epoch after the first: the run ends after epoch 3 of 10 with
    exit 0, a line naming the epoch, the best epoch and how to go on, and best.pth, last.pth and
    metrics.csv agreeing. --resume with the same patience trains nothing and says why; with
    --patience 3 it trains one epoch more (its count went on from 2, not from 0), then stops."""
    scripted_validation(monkeypatch, [(0.5, 0.5 + epoch / 10) for epoch in range(10)])
    run = tmp_path / "run"
    assert run_main("--data-path", tiny_data, "--output-dir", run, *FAST[:-1], "10", "--patience", "2") == 0
    out = capsys.readouterr().out
    assert "stopping early after epoch 3 of 10: no better best.pth for 2 epochs (--patience 2; best.pth holds " \
           f"epoch 1). To train on: python train.py --resume {run / 'last.pth'} --patience 4" in out
    last = torch.load(run / "last.pth", weights_only=True)
    assert (last["epoch"], last["best_epoch"], torch.load(run / "best.pth", weights_only=True)["epoch"]) == (3, 1, 1)
    assert [int(r["epoch"]) for r in metrics(run)] == [1, 2, 3]

    before = (run / "last.pth").read_bytes()
    assert run_main("--resume", run / "last.pth") == 0
    out = capsys.readouterr().out
    assert f"{run / 'last.pth'} stopped early at epoch 3 of 10: no better best.pth for 2 epochs (--patience 2; " \
           "best.pth holds epoch 1). To train on: " in out and "--patience M, with M more than 2" in out
    assert (run / "last.pth").read_bytes() == before

    assert run_main("--resume", run / "last.pth", "--patience", "3") == 0
    assert "stopping early after epoch 4 of 10: no better best.pth for 3 epochs" in capsys.readouterr().out
    assert [int(r["epoch"]) for r in metrics(run)] == [1, 2, 3, 4]


# ---- TensorBoard ------------------------------------------------------------------------------

def test_tensorboard_event_files_hold_each_epoch_once(tiny_data, tmp_path, capsys):
    """--tensorboard writes event files into the run folder that TensorBoard's own reader reads
    back: every epoch's losses, accuracies, learning rate, speed and data-wait share, equal to
    metrics.csv; a resumed run adds its epochs, each epoch once."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -r requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert run_main("--data-path", tiny_data, "--output-dir", run, *FAST, "--tensorboard") == 0
    assert run_main("--resume", run / "last.pth", "--epochs", "3") == 0
    events = EventAccumulator(str(run))
    events.Reload()
    rows = metrics(run)
    for tag, field in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/val_top1", "val_top1"),
                       ("accuracy/val_top5", "val_top5"), ("lr", "lr"), ("speed/images_per_second",
                       "images_per_second"), ("speed/data_wait_share", "data_wait")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3], tag
        assert [s.value for s in scalars] == pytest.approx([float(r[field]) for r in rows], rel=1e-5), tag
    assert all(0 <= float(r["data_wait"]) < 1 for r in rows)


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    parser = train_script.get_args_parser()
    args = parser.parse_args(["--tensorboard", "--output-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_:
        train_script.check_args(parser, args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: --tensorboard needs the tensorboard package: pip install -r "
                                       "requirements-tensorboard.txt\n")
    assert not (tmp_path / "run").exists()


def test_a_run_waiting_for_its_images_says_once_what_to_try(tmp_path):
    """Large PNGs (no draft decoding) at 32 px in the main process: most of each epoch waits for
    data. The epoch lines say how much, and one note (not one per epoch) says what would help."""
    for c in ("a", "b"):
        (tmp_path / "big" / c).mkdir(parents=True)
        for i in range(10):
            noise = torch.randint(0, 256, (900, 1200, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            Image.fromarray(noise.numpy()).save(tmp_path / "big" / c / f"{i}.png")
    result = run_script("train.py", "--data-path", tmp_path / "big", "--output-dir", tmp_path / "run", "--img-size", "32",
                        "--batch-size", "4", "--workers", "0", "--epochs", "2", "--precise-bn", "0")
    shares = [int(s) for s in re.findall(r"^epoch \d/2 .* data (\d+) %", result.stdout, re.M)]
    notes = re.findall(r"^  note: training waited for its images (\d+) % of epoch (\d); (.*) would feed it faster$",
                       result.stderr, re.M)
    assert len(shares) == 2 and shares[0] > 30 and len(notes) == 1, (result.stdout, result.stderr)
    share, epoch, tips = notes[0]
    assert (int(share), int(epoch)) == (shares[0], 1)
    assert tips.startswith("more --workers (now 0; ") and tips.endswith(" or images stored smaller on disk (about "
                                                                          "64 px on the short side)"), tips
