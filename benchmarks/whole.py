"""benchmark.py --whole: whole commands as a user runs them, launch to exit on a pseudo-terminal,
each against what it replaces, the two taking turns, the median of --rounds: train.py against
the tutorial's program (tutorial_train.py), predict.py over a folder against a plain loop
(plain_predict_folder.py) and on one image against the six lines (plain_predict_one.py), then
predict.py over --images JPEGs from best.pth against the same command on its ONNX export.
Speed-up = the baseline's seconds / this repo's."""
import csv
import importlib.util
import os
import subprocess
import sys
import tempfile

import torch
import torchvision

from benchmarks.measuring import ROOT, Table, median, on_pty, peer, write_photos


def run(args):
    data = args.data_path or os.path.join(ROOT, "data", "digits")
    size, batch = str(args.img_size or 64), str(args.batch_size)
    print("whole commands, launch to exit on a pseudo-terminal: the plain scripts of benchmarks/ (then ONNX Runtime "
          "on the export) against this repo's")
    table = Table(f"whole command, median of {args.rounds} rounds", speed_up=True)
    with tempfile.TemporaryDirectory() as tmp:
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        paths = write_photos(photos, 15 * args.batch_size, (96, 96))
        weights = os.path.join(tmp, "b0.pth")
        torch.save(torchvision.models.efficientnet_b0().state_dict(), weights)  # the layout of torchvision's download

        base, ours, base_epoch, ours_epoch = [], [], [], []
        for r in range(args.rounds):
            ran = on_pty([sys.executable, peer("tutorial_train.py"), "--data-path", data, "--epochs", "2",
                          "--img-size", size, "--batch-size", batch, "--output-dir", os.path.join(tmp, f"t{r}")])
            base.append(ran.seconds)
            base_epoch.append(sum(float(line.split()[-1]) for line in ran.output.splitlines()
                                  if line.startswith("epoch ") and " seconds " in line) / 2)
            folder = os.path.join(tmp, f"r{r}")
            ours.append(on_pty([sys.executable, os.path.join(ROOT, "train.py"), "--data-path", data, "--epochs", "2",
                                "--img-size", size, "--batch-size", batch, "--output-dir", folder]).seconds)
            with open(os.path.join(folder, "metrics.csv"), newline="") as f:
                ours_epoch.append(sum(float(row["epoch_seconds"]) for row in csv.DictReader(f)) / 2)
        table.row(f"train.py, 2 epochs on {os.path.basename(os.path.normpath(data))} at {size} px, batch {batch}",
                  median(base), median(ours), "s")
        table.row("  the same, seconds per epoch", median(base_epoch), median(ours_epoch), "s")

        predict = os.path.join(ROOT, "predict.py")
        commands = {  # row: (the baseline's command, this repo's), each run as `python ...`
            f"predict.py over {len(paths)} 96x96 JPEGs (eval 256/224)": (
                [peer("plain_predict_folder.py"), weights, photos], [predict, photos, "--weights", weights]),
            "predict.py on one image, launch to answer": (
                [peer("plain_predict_one.py"), weights, paths[0]], [predict, paths[0], "--weights", weights]),
        }
        if args.images:  # the same folder through ONNX Runtime: predict.py on the exported file
            import export
            if export.missing_onnx_packages() or importlib.util.find_spec("onnxruntime") is None:
                print("(no ONNX Runtime rows: pip install -r requirements-export.txt for them)")
            else:
                large = os.path.join(tmp, "large")
                os.makedirs(large)
                write_photos(large, args.images, (500, 375))
                onnx = os.path.join(tmp, "b0.onnx")
                subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--weights", weights, "--format",
                                "onnx", "--dynamic-batch", "--output", onnx], check=True, capture_output=True)
                repo = [predict, large, "--weights", weights]
                commands[f"predict.py over {args.images} 500x375 JPEGs at 224 px vs ONNX Runtime"] = (
                    [predict, large, "--weights", onnx], repo)
                commands["  the same, predict.py --amp"] = ([predict, large, "--weights", onnx], repo + ["--amp"])
        for name, (plain, repo) in commands.items():
            base, ours = [], []
            for _ in range(args.rounds):
                base.append(on_pty([sys.executable, *plain]).seconds)
                ours.append(on_pty([sys.executable, *repo]).seconds)
            table.row(name, median(base), median(ours), "s")
    return table.rows
