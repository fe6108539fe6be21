"""train.py --eval-only: what it scores, on which data and weights, and where it writes."""
import fcntl
import os

import pytest
import torch

import errors
from conftest import FAST, check_predictions, read_csv, run_main, run_script


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


def test_eval_only_writes_predictions_where_asked_with_and_without_tta(tiny_run, tmp_path):
    """--eval-only reports and writes predictions.csv (and mistakes.png) into --output-dir, leaving
    the run folder as it was; --tta evaluates each image with its mirror image and says so."""
    data, run, _ = tiny_run
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
