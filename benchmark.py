"""Speed and memory of this repo's training and prediction paths against a plain torchvision loop,
measured in one run on this machine, as ratios.

    python benchmark.py                                   # B0 at 224 px, batch 32
    python benchmark.py --model b3 --img-size 300 --batch-size 16 --device cuda
    python benchmark.py --time-to-accuracy                # adds: time to 95 % on the bundled digits

Baseline: torchvision's efficientnet_bX in fp32, NCHW, eager, SGD (what the tutorial does).
This repo: train.py's default path (channels-last, bf16 autocast where fast, AdamW) and
predict.py's path (BatchNorm folded into the convs, channels-last, inference mode).
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torchvision

import utils
from model import VARIANTS, create_model, fuse_bn
from my_dataset import MyDataSet
from train import amp_dtype

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark this repo against plain torchvision.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="b0", choices=list(VARIANTS), help="variant")
    p.add_argument("--img-size", type=int, default=None, help="resolution (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="this repo's autocast")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training (slow warm-up)")
    p.add_argument("--workers", type=int, default=utils.default_workers(), help="loader processes")
    p.add_argument("--time-to-accuracy", action="store_true",
                   help="train.py on the bundled digits at 64 px to 95 %% val top-1: default vs tutorial recipe")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step, batch, steps, device):
    """images/s of `step()`, after two warm-up calls."""
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator statistics, or on a CPU the resident
    set size sampled every millisecond (large tensors are returned to the OS when freed)."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.running = self.rss(), True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()


def train_step_fn(model, optimizer, x, y, autocast, channels_last):
    loss_fn = torch.nn.CrossEntropyLoss()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def infer_fn(model, x, autocast=None):
    def step():
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            model(x)
    return step


def baseline_model(name, device):
    return getattr(torchvision.models, f"efficientnet_{name}")().to(device)


def write_photos(folder, n, size):
    """n JPEGs of `size` cut from a real photo (matplotlib's sample of Grace Hopper), flipped and
    shifted so each decodes differently."""
    import matplotlib
    from PIL import Image, ImageOps
    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    paths = []
    for i in range(n):
        img = photo.rotate(i * 7, expand=False).resize(size)
        img = ImageOps.mirror(img) if i % 2 else img
        paths.append(os.path.join(folder, f"photo_{i:03d}.jpg"))
        img.save(paths[-1], quality=90)
    return paths


def loader_rate(paths, variant, img_size, batch, workers, draft):
    ds = MyDataSet(paths, [0] * len(paths), utils.build_transform(variant, img_size, train=True, scale=(0.25, 1)),
                   draft_size=round(img_size / 0.5) if draft else None)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=MyDataSet.collate_fn,
                                         persistent_workers=workers > 0, shuffle=True)
    for _ in loader:  # warm-up epoch: workers started, files in the page cache
        pass
    start = time.perf_counter()
    n = sum(len(images) for images, _ in loader)
    return n / (time.perf_counter() - start)


def folder_rate(paths, args, device, batch):
    """predict.py's path: weights file -> folded model, DataLoader workers decoding, batched inference."""
    import predict
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "w.pth")
        torch.save(baseline_model(args.model, "cpu").state_dict(), weights)
        model, info, transform, resize = predict.load_model(weights, device=device)
    loader = torch.utils.data.DataLoader(predict.ImagePaths(paths, transform, 2 * resize), batch_size=batch,
                                         num_workers=args.workers, collate_fn=predict.ImagePaths.collate)
    start = time.perf_counter()
    n = sum(1 for _ in predict.predict(model, loader, device, 5))
    return n / (time.perf_counter() - start)


def folder_rate_baseline(paths, name, device, batch):
    """The tutorial's way: open, transform and predict in the main process, torchvision eager fp32."""
    from PIL import Image
    model = baseline_model(name, device).eval()
    transform = getattr(torchvision.models, f"EfficientNet_{name.upper()}_Weights").IMAGENET1K_V1.transforms()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            model(x.to(device)).softmax(1).topk(5)
    return len(paths) / (time.perf_counter() - start)


TUTORIAL_RECIPE = ["--optimizer", "sgd", "--lr", "0.01", "--weight-decay", "1e-4", "--warmup-epochs", "0",
                   "--label-smoothing", "0", "--crop-scale", "0.08", "1", "--batch-size", "16", "--amp", "off",
                   "--no-channels-last"]


def time_to_accuracy(target=0.95, epochs=10):
    """Training seconds until val top-1 first reaches `target` on the bundled digits at 64 px.
    Each run is stopped (SIGTERM, as a user's Ctrl-C) once it gets there."""
    recipes = {
        "default recipe (--no-hflip, as the quick start)": ["--no-hflip"],
        "tutorial recipe": TUTORIAL_RECIPE,
        "tutorial recipe --no-hflip": TUTORIAL_RECIPE + ["--no-hflip"],
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(recipes.items()):
            run = os.path.join(tmp, str(i))
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), "--img-size", "64", "--epochs",
                                     str(epochs), "--output-dir", run, *flags],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows, reached = [], None
            while reached is None and proc.poll() is None:
                time.sleep(0.5)
                if os.path.exists(os.path.join(run, "metrics.csv")):
                    with open(os.path.join(run, "metrics.csv"), newline="") as f:
                        rows = list(csv.DictReader(f))
                    hit = [r for r in rows if float(r["val_top1"]) >= target]
                    if hit:
                        reached = (sum(float(r["epoch_seconds"]) for r in rows[:rows.index(hit[0]) + 1]),
                                   int(hit[0]["epoch"]))
            proc.terminate()
            proc.wait()
            out[name] = (reached, [float(r["val_top1"]) for r in rows])
    return out


def main(args):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    variant = VARIANTS[args.model]
    size = args.img_size or variant.train_size
    b = args.batch_size
    autocast = amp_dtype(args.amp, device)
    torch.manual_seed(0)
    x = torch.randn(b, 3, size, size, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    print(f"EfficientNet-{args.model.upper()} at {size}px, batch {b}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}, this repo's autocast: {autocast or 'off'}")
    rows = []

    def row(name, ours, base, unit, better="higher"):
        ratio = ours / base
        rows.append((name, ours, base, ratio, unit))
        print(f"{name:<44} {ours:>10.1f} {base:>10.1f} {unit:<6} {ratio:>6.2f}x", flush=True)

    print(f"{'measurement':<44} {'this repo':>10} {'baseline':>10} {'unit':<6} {'ratio':>7}")
    # 0. the same model either way: fp32, NCHW, eager, same optimizer
    base = baseline_model(args.model, device).train()
    ours = create_model(args.model).to(device).train()
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)  # noqa: E731
    base_step = train_step_fn(base, sgd(base), x, y, None, False)
    tv_train = rate(base_step, b, args.steps, device)
    same = rate(train_step_fn(ours, sgd(ours), x, y, None, False), b, args.steps, device)
    row("train step, same settings (fp32 NCHW)", same, tv_train, "img/s")

    # 1. train.py's default path against the tutorial's plain loop
    ours = ours.to(memory_format=torch.channels_last)
    adamw = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.05)
    step = train_step_fn(ours, adamw, x, y, autocast, True)
    ours_train = rate(step, b, args.steps, device)
    row("train step: train.py default vs tutorial loop", ours_train, tv_train, "img/s")
    if args.compile:
        compiled = torch.compile(ours)
        start = time.perf_counter()
        train_step_fn(compiled, adamw, x, y, autocast, True)()
        warmup = time.perf_counter() - start
        row(f"train step, --compile (warm-up {warmup:.0f}s)",
            rate(train_step_fn(compiled, adamw, x, y, autocast, True), b, args.steps, device), tv_train, "img/s")

    # 3. peak memory of one training step
    with PeakMemory(device) as mem_ours:
        step()
    with PeakMemory(device) as mem_base:
        base_step()
    row("peak memory of one train step", mem_ours.peak / 2**20, mem_base.peak / 2**20, "MiB")
    # --grad-checkpointing: the memory lever that keeps results exact, paid for in speed
    lean = create_model(args.model, grad_checkpointing=True).to(device, memory_format=torch.channels_last).train()
    lean_step = train_step_fn(lean, torch.optim.AdamW(lean.parameters()), x, y, autocast, True)
    lean_rate = rate(lean_step, b, args.steps, device)
    with PeakMemory(device) as mem_lean:
        lean_step()
    row("peak memory, --grad-checkpointing", mem_lean.peak / 2**20, mem_base.peak / 2**20, "MiB")
    row("train step, --grad-checkpointing", lean_rate, tv_train, "img/s")
    del lean, lean_step

    # 2. predict.py's path against torchvision eager
    base.eval()
    tv_infer = rate(infer_fn(base, x), b, args.steps, device)
    fused = fuse_bn(ours.eval())
    row("inference: predict.py vs torchvision eager", rate(infer_fn(fused, x.contiguous(
        memory_format=torch.channels_last)), b, args.steps, device), tv_infer, "img/s")
    row("inference, predict.py --amp (bf16)", rate(infer_fn(fused, x.contiguous(
        memory_format=torch.channels_last), torch.bfloat16), b, args.steps, device), tv_infer, "img/s")

    # 4. the loader alone, on phone-sized JPEGs, against the training step it feeds
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in ((1600, 1200), (500, 375)):
            paths = write_photos(tmp, 2 * b, (w, h))
            full = loader_rate(paths, variant, size, b, args.workers, draft=False)
            drafted = loader_rate(paths, variant, size, b, args.workers, draft=True)
            row(f"loader {w}x{h} JPEG, {args.workers} workers vs train step", drafted, ours_train, "img/s")
            row(f"loader {w}x{h} JPEG: draft decode vs full", drafted, full, "img/s")

    # predict.py end to end over a folder of JPEGs (decoding in workers) against a plain loop
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(tmp, 10 * b, (500, 375))
        row(f"predict.py over {len(paths)} JPEGs vs plain torchvision loop", folder_rate(paths, args, device, b),
            folder_rate_baseline(paths, args.model, device, b), "img/s")

    if args.time_to_accuracy:
        print("time to 95 % val top-1, B0 on the bundled digits at 64 px (at most 10 epochs):")
        for name, (reached, top1) in time_to_accuracy().items():
            print(f"  {name:<48} " + (f"{reached[0]:5.0f}s (epoch {reached[1]})" if reached else "  not reached")
                  + "   val top-1 per epoch: " + " ".join(f"{t:.3f}" for t in top1), flush=True)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
