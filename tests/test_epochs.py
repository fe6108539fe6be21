"""Which epoch a run keeps and when it ends: best.pth among epochs of equal top-1, --patience and
its resume (also under torchrun), --resume of a run with nothing left to train, --eval-only on the
data a checkpoint was trained on, and TensorBoard's record of the epochs. The validation figures
are set by the test where the rule is the point (utils.evaluate's real result, with its top-1
and loss replaced); the training is real."""
import csv
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import train as train_script
import errors
import utils
from conftest import FAST, ROOT, TRAIN_MAIN_UNDER_TORCHRUN, copy_digits
from test_runs import run_copy, run_main  # noqa: F401 (a fixture)


def scripted_validation(monkeypatch, figures):
    """utils.evaluate gives epoch n the (top-1, loss) figures[n - 1], on its real confusion matrix
    and predictions: the rule that picks best.pth sees exactly these."""
    evaluate, calls = utils.evaluate, []

    def scripted(*args, **kwargs):
        top1, loss = figures[len(calls)]
        calls.append(1)
        return dict(evaluate(*args, **kwargs), val_top1=top1, val_loss=loss)
    monkeypatch.setattr(utils, "evaluate", scripted)


def metrics(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


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


def test_resume_of_a_finished_run_says_so_and_how_to_train_longer(run_copy, capsys):
    """The tiny run trained all of its 2 epochs: --resume says so, names --epochs, exits 0 and
    leaves every file of the run as it was (before: "resuming at epoch 3", then "done")."""
    _, run = run_copy
    before = {name: (run / name).read_bytes() for name in sorted(os.listdir(run))}
    assert run_main("--resume", run / "last.pth") == 0
    out, err = capsys.readouterr()
    assert out == (f"{run / 'last.pth'} has finished its run: it holds epoch 2 of --epochs 2 (best.pth holds epoch "
                   f"{torch.load(run / 'best.pth', weights_only=True)['epoch']}). To train it longer: python train.py "
                   f"--resume {run / 'last.pth'} --epochs M, with M more than 2\n") and err == ""
    assert {name: (run / name).read_bytes() for name in sorted(os.listdir(run))} == before
    assert run_main("--resume", run / "last.pth", "--epochs", "3", "--workers", "0") == 0
    assert "resuming" in capsys.readouterr().out and len(metrics(run)) == 3


def test_eval_only_without_data_path_evaluates_the_data_it_was_trained_on(tiny_run, run_copy, tmp_path, capsys):
    """--eval-only --weights best.pth without --data-path scores the folder the run trained on (and
    says so), with the loss the run had; a checkpoint whose folder is not on this machine is
    refused in one line that names --data-path."""
    data, _, _ = tiny_run
    _, run = run_copy
    best = torch.load(run / "best.pth", weights_only=True)
    row = torch.load(run / "last.pth", weights_only=True)["history"][best["epoch"] - 1]
    assert run_main("--eval-only", "--weights", run / "best.pth", "--workers", "0", "--output-dir", tmp_path / "e") == 0
    out = capsys.readouterr().out
    assert f"evaluating on {data}, the data {run / 'best.pth'} was trained on" in out
    assert f"loss {row['val_loss']:.4f}  top-1 {best['val_top1']:.4f}" in out

    best["meta"]["args"]["data_path"] = str(tmp_path / "gone")
    torch.save(best, tmp_path / "moved.pth")
    with pytest.raises(errors.UsageError, match=r"moved.pth was trained on .*gone, which is not a folder here; pass "
                                             "--data-path"):
        run_main("--eval-only", "--weights", tmp_path / "moved.pth", "--workers", "0")


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


# every rank gets the same scripted figures: the rule must stop all of them after the same epoch
SCRIPTED_UNDER_TORCHRUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch, utils, train
    evaluate, calls = utils.evaluate, []
    def scripted(*args, **kwargs):
        calls.append(1)
        return dict(evaluate(*args, **kwargs), val_top1=0.5, val_loss=float(len(calls)))
    utils.evaluate = scripted
""") + TRAIN_MAIN_UNDER_TORCHRUN


def test_patience_stops_every_torchrun_process_after_the_same_epoch(tmp_path):
    """Two gloo processes: --patience 1 ends both after epoch 2 of 6 (a process going on alone
    would wait for the other for ever), exit 0, one line from rank 0."""
    data = copy_digits(tmp_path / "data", per_class=8)
    script = tmp_path / "scripted_train.py"
    script.write_text(SCRIPTED_UNDER_TORCHRUN.format(root=ROOT))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--data-path", data, "--output-dir", str(run), *FAST[:-1], "6", "--batch-size", "4", "--patience", "1",
           "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("stopping early after epoch 2 of 6") == 1
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2
