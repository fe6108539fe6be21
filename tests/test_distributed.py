"""train.py under a real `torchrun --standalone --nproc_per_node=2` on the CPU (gloo)."""
import csv
import os
import subprocess
import sys
import textwrap

import torch

from conftest import FAST, ROOT, TRAIN_MAIN_UNDER_TORCHRUN, copy_digits, run_script

# Runs train.py's main() in each torchrun process, and records what each rank evaluates, so the
# test can compare the ranks' weights, and which ranks read the data folder; every folder counts as
# large (its headers are checked in the background). Nothing in train.py is changed.
SPY = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    def audit(event, args):
        if event == "os.scandir" and str(args[0]).startswith({data!r}):
            with open(os.path.join({spy_dir!r}, f"scanned-by-rank{{os.environ['RANK']}}"), "a") as f:
                f.write(str(args[0]) + "\\n")
    sys.addaudithook(audit)
    import torch, utils, train
    utils.CHECK_AT_START = 0
    evaluate = utils.evaluate
    def spy(model, *args, **kwargs):
        torch.save(model.state_dict(), os.path.join({spy_dir!r}, f"rank{{os.environ['RANK']}}.pth"))
        return evaluate(model, *args, **kwargs)
    utils.evaluate = spy
""") + TRAIN_MAIN_UNDER_TORCHRUN


def test_torchrun_two_processes_on_cpu(tmp_path):
    """Two gloo processes train 2 epochs; both end with identical weights, files are written once,
    and the reported top-1 over an odd number of validation images equals a single-process
    evaluation of best.pth (every image counted exactly once). Only rank 0 reads the folder, and
    a broken file found after the start is named once and never stops the run."""
    data = copy_digits(tmp_path / "data", classes=("0", "1", "2"), per_class=8)
    os.remove(os.path.join(data, "2", sorted(os.listdir(os.path.join(data, "2")))[0]))  # class 2: 7 images
    broken = os.path.join(data, "1", "notes.png")
    with open(broken, "w") as f:
        f.write("not an image")
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    script = tmp_path / "spy_train.py"
    script.write_text(SPY.format(root=ROOT, spy_dir=str(spy_dir), data=data))
    out = tmp_path / "weights" / "b0-data"  # the default run folder: rank 0 names it for every rank
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--data-path", data, *FAST, "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "x 2 processes" in result.stdout and "global batch 16" in result.stdout
    assert result.stdout.count("epoch 2/2") == 1  # only rank 0 prints
    assert sorted(os.listdir(spy_dir)) == ["rank0.pth", "rank1.pth", "scanned-by-rank0"]
    assert result.stderr.count("could not be used") == 1 and f"{broken}: not an image" in result.stderr

    rank0 = torch.load(spy_dir / "rank0.pth", map_location="cpu", weights_only=True)
    rank1 = torch.load(spy_dir / "rank1.pth", map_location="cpu", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # parameters and BN statistics
    best = torch.load(out / "best.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in best["model"])

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # 3 classes of 8, 8, 7 images: 2 + 2 + 1 = 5 validation images, an odd number for 2 ranks
    with open(out / "predictions.csv", newline="") as f:  # gathered from both ranks: each image once
        predictions = list(csv.DictReader(f))
    assert len({r["path"] for r in predictions}) == len(predictions) == 5
    assert sum(int(r["correct"]) for r in predictions) == round(best["val_top1"] * 5)
    single = run_script("train.py", "--data-path", data, *FAST, "--weights", out / "best.pth", "--eval-only",
                        "--output-dir", tmp_path / "single")
    assert "5 validation images" in single.stdout
    assert f"top-1 {best['val_top1']:.4f}" in single.stdout
    assert best["val_top1"] * 5 == round(best["val_top1"] * 5)  # a whole number of the 5 images


# ---- --patience under torchrun ----------------------------------------------------------------

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
