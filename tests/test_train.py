"""train.py as a user runs it: a subprocess on a tiny real folder of digit images at 32 px."""
import csv
import json
import os

import pytest
import torch
import torchvision
from PIL import Image

from conftest import FAST, run_script

import checkpoint
import weight_files


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
                             "epoch_seconds", "images_per_second", "data_wait"]
    for r in rows:
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
    assert "--resume" in refused.stderr and "Traceback" not in refused.stderr
    assert (tmp_path / "weights" / "b0-tiny" / "best.pth").read_bytes() == before


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


def test_eval_only_reports_and_writes_only_its_predictions(tiny_data, tmp_path):
    """--eval-only evaluates a checkpoint on the validation split; it writes predictions.csv and
    mistakes.png into a new folder eval/ beside the weights (the run's own stay as they were),
    nothing else, and no run folder."""
    out = tmp_path / "run"
    run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST, "--epochs", "1")
    best = torch.load(out / "best.pth", weights_only=True)
    files = sorted(os.listdir(out))
    own = (out / "predictions.csv").read_bytes()
    result = run_script("train.py", "--data-path", tiny_data, *FAST, "--weights", out / "best.pth",
                        "--eval-only", cwd=tmp_path)
    assert f"top-1 {best['val_top1']:.4f}" in result.stdout
    assert sorted(os.listdir(out)) == sorted(files + ["eval"]) and not (tmp_path / "weights").exists()
    assert (out / "predictions.csv").read_bytes() == own and (out / "eval" / "predictions.csv").exists()


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


def as_format_1(src, dest):
    """A checkpoint as train.py wrote it before checkpoints had a format version: no
    meta["format"], and no flag that was added since (--lean-activations, the recipe's options)."""
    ckpt = torch.load(src, weights_only=True)
    del ckpt["meta"]["format"]
    for flag in ("lean_activations", "drop_path", "precise_bn", "dropout", "balance", "auto_augment", "ra_magnitude",
                 "random_erase", "mixup_alpha", "cutmix_alpha"):
        del ckpt["meta"]["args"][flag]
    torch.save(ckpt, dest)


def test_checkpoints_of_format_1_predict_and_resume(tiny_data, tmp_path):
    """best.pth and last.pth written before the format field still predict exactly as before and
    resume; the resumed run writes the current format with the new flags at their defaults. A
    format newer than this code reads is refused by name."""
    out, old = tmp_path / "run", tmp_path / "old"
    run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST, "--epochs", "1")
    old.mkdir()
    for name in ("best.pth", "last.pth"):
        as_format_1(out / name, old / name)
    assert "format" not in torch.load(old / "last.pth", weights_only=True)["meta"]
    images = os.path.join(tiny_data, "1")
    expected = run_script("predict.py", images, "--weights", out / "best.pth", "--topk", "3").stdout
    assert run_script("predict.py", images, "--weights", old / "best.pth", "--topk", "3").stdout == expected

    result = run_script("train.py", "--resume", old / "last.pth", "--epochs", "2")
    assert "resuming" in result.stdout and "epoch 2/2" in result.stdout
    last = torch.load(old / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["meta"]["format"] == checkpoint.FORMAT
    assert last["meta"]["args"]["lean_activations"] is True and last["meta"]["args"]["img_size"] == 32
    # the old run had stochastic depth 0.2 and no precise BatchNorm: it goes on as it began
    assert (last["meta"]["args"]["drop_path"], last["meta"]["args"]["precise_bn"]) == (0.2, 0)
    assert last["meta"]["args"]["auto_augment"] is None and last["meta"]["args"]["mixup_alpha"] == 0
    assert [int(r["epoch"]) for r in read_csv(old / "metrics.csv")] == [1, 2]  # from the history inside

    # and a file from a newer version of the scripts is named as such, not misread
    ckpt = torch.load(out / "best.pth", weights_only=True)
    ckpt["meta"]["format"] = checkpoint.FORMAT + 1
    torch.save(ckpt, tmp_path / "future.pth")
    result = run_script("predict.py", tiny_data, "--weights", tmp_path / "future.pth", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "future.pth" in result.stderr and "newer version" in result.stderr


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


def test_interrupt_before_any_epoch_finished_says_so(tiny_data, tmp_path):
    from test_hostile import interrupted_in
    run = tmp_path / "run"
    result = interrupted_in("utils.train_one_epoch", tmp_path, "--data-path", tiny_data, "--output-dir", run, *FAST)
    assert result.returncode == 130 and "no epoch finished yet" in result.stderr
    assert "holds epoch 0" not in result.stderr
    result = run_script("train.py", "--resume", run / "last.pth", "--epochs", "1")
    assert "at epoch 1 (no epoch had finished)" in result.stdout and "-1.0000" not in result.stdout


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
