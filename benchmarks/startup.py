"""benchmark.py --startup: launch to the first training step on folders of many files, train.py
against torchvision's plain start (plain_start.py), both whole processes on a pseudo-terminal
stopped at that step by until_first_step.py, taking turns, the median of --rounds; then
predict.py's peak memory over the same folder, which must not grow with it. The ratio is
train.py's seconds over the plain start's."""
import os
import sys
import tempfile

from benchmarks.measuring import ROOT, Table, median, on_pty, peer, write_photos


def link_folder(root, n, classes=100):
    """A folder of n images in `classes` class folders: hard links to a few real JPEGs (write_photos),
    so a million files cost only their directory entries (at most 50,000 links per file: ext4
    allows 65,000)."""
    sources = write_photos(root, max(8, n // 50_000 + 1), (160, 120))
    for c in range(classes):
        folder = os.path.join(root, "data", f"class_{c:03d}")
        os.makedirs(folder)
        for i in range(n // classes):
            os.link(sources[(c + i) % len(sources)], os.path.join(folder, f"{i:07d}.jpg"))
    return os.path.join(root, "data")


def predict_memory(tmp, data, args):
    """Peak resident MiB of predict.py writing --csv for every image in `data` with a 32 px model."""
    from types import SimpleNamespace
    import checkpoint
    from model import VARIANTS, create_model
    classes = sorted(os.listdir(data))
    model = create_model("b0", len(classes))
    meta = checkpoint.make_meta(SimpleNamespace(model="b0", img_size=32), classes, VARIANTS["b0"], model.bn_eps)
    weights = os.path.join(tmp, "best.pth")
    checkpoint.save_best(weights, model, meta, 1, 0.0)
    return on_pty([sys.executable, os.path.join(ROOT, "predict.py"), data, "--weights", weights, "--csv",
                   os.path.join(tmp, "predictions.csv"), "--workers", str(args.workers), "--batch-size", "64"])[1]


def run(args):
    sizes = args.startup or [10_000, 100_000, 1_000_000]
    print(f"launch to the first training step, B0 at 64 px, {args.workers} workers: torchvision's plain start "
          f"(benchmarks/plain_start.py) against train.py; predict.py's peak memory over the same folder")
    table = Table(f"folder, median of {args.rounds} rounds")
    until_first_step = peer("until_first_step.py")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = link_folder(tmp, n)
            base, ours = [], []
            for r in range(args.rounds):
                base.append(on_pty([sys.executable, until_first_step, peer("plain_start.py"), data,
                                    str(args.workers)]).seconds)
                ours.append(on_pty([sys.executable, until_first_step, os.path.join(ROOT, "train.py"),
                                    "--data-path", data, "--img-size", "64", "--workers", str(args.workers),
                                    "--output-dir", os.path.join(tmp, f"run{r}")]).seconds)
            table.row(f"{n:,} files", median(base), median(ours), "s")
            if n <= 100_000:
                table.row("  predict.py over them, peak resident memory", None, predict_memory(tmp, data, args), "MiB")
    return table.rows
