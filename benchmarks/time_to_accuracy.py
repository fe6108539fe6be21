"""benchmark.py --time-to-accuracy: launch to the moment best.pth first reaches --target val
top-1, train.py's defaults against the tutorial's training program (tutorial_train.py:
torchvision's B0, its split, SGD, its cosine schedule), each for at most --max-epochs, a run per
--seeds, the two taking turns. A run is stopped (SIGTERM to its process group) once it gets
there: what follows would time the epochs a user no longer waits for."""
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.measuring import ROOT, Table, peer


def run_to_accuracy(command, log, top1_so_far, target):
    """(seconds from launch until `target` val top-1 was first logged, or None; that epoch; the
    top-1 of each epoch seen), the command's output going to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    top1, reached = [], None
    while reached is None and proc.poll() is None:
        time.sleep(0.1)
        top1 = top1_so_far()
        hit = [i for i, t in enumerate(top1) if t >= target]
        if hit:
            reached = (time.perf_counter() - start, hit[0] + 1, top1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    if reached is None and proc.returncode != 0:
        with open(log) as f:
            sys.exit(f"benchmark: {command[1]} failed:\n{f.read()[-2000:]}")
    return reached or (None, None, top1)


def tutorial_top1(log):
    """The tutorial program's val top-1 per epoch so far: it prints a line per epoch."""
    with open(log) as f:
        return [float(t) for t in re.findall(r"epoch \d+ accuracy ([\d.]+)", f.read())]


def train_top1(run):
    """train.py's val top-1 per epoch so far, from its run folder's metrics.csv."""
    if not os.path.exists(os.path.join(run, "metrics.csv")):
        return []
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return [float(r["val_top1"]) for r in csv.DictReader(f)]


def run(args):
    """A row per seed: the tutorial's seconds and train.py's, each run's epoch named in the row,
    or the best val top-1 of a run that never got there (its seconds then "-")."""
    data = args.data_path or os.path.join(ROOT, "data", "digits")
    size, epochs = str(args.img_size or 64), str(args.max_epochs)
    name = os.path.basename(os.path.normpath(data))
    print(f"time to val top-1 {args.target} on {name} at {size} px, B0 from scratch, batch 16, at most {epochs} epochs, "
          f"launch to best.pth; {torch.get_num_threads()} threads: the tutorial's program "
          f"(benchmarks/tutorial_train.py) against train.py's defaults")
    table = Table("seed: the epoch it got there, tutorial / train.py", speed_up=True)
    reached = lambda x: f"epoch {x[1]}" if x[0] is not None else f"not in {epochs} epochs ({max(x[2], default=0):.3f})"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            log, folder = os.path.join(tmp, f"tutorial-{seed}.log"), os.path.join(tmp, f"run-{seed}")
            tutorial = run_to_accuracy(
                [sys.executable, peer("tutorial_train.py"), "--data-path", data, "--epochs", epochs,
                 "--img-size", size, "--batch-size", "16", "--output-dir", os.path.join(tmp, f"t{seed}"),
                 "--seed", str(seed)], log, lambda: tutorial_top1(log), args.target)
            ours = run_to_accuracy(
                [sys.executable, os.path.join(ROOT, "train.py"), "--data-path", data, "--img-size", size,
                 "--epochs", epochs, "--seed", str(seed), "--output-dir", folder],
                os.path.join(tmp, f"train-{seed}.log"), lambda: train_top1(folder), args.target)
            table.row(f"seed {seed}: {reached(tutorial)} / {reached(ours)}", tutorial[0], ours[0], "s")
    return table.rows
