"""Speed and memory of this repo's training and prediction paths against a plain torchvision loop,
measured in one run on this machine, as ratios.

    python benchmark.py                                   # B0 at 224 px, batch 32
    python benchmark.py --model b3 --img-size 300 --batch-size 16 --device cuda
    python benchmark.py --time-to-accuracy                # launch to 95 % val top-1 on the digits

Baseline: torchvision's efficientnet_bX in fp32, NCHW, eager, SGD (what the tutorial does).
This repo: train.py's default path (channels-last, bf16 autocast where fast, AdamW, the lean
BatchNormSiLU and SigmoidGate of activations.py) and predict.py's path (BatchNorm folded into the convs,
channels-last, gates in place, inference mode). Speeds are the median of rounds in which all
contenders take turns; memory is measured in a fresh process per contender (see peak_memory).
"""
import argparse
import csv
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from functools import partial

import torch
import torchvision

import cli
import exported
import model_files
import recipe
import runtime
import transforms
from inference import fuse_bn
from model import VARIANTS, create_model
from my_dataset import MyDataSet

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    p = cli.ArgumentParser(description="Benchmark this repo against plain torchvision.")
    p.add_argument("--model", default="b0", choices=list(VARIANTS), help="variant")
    p.add_argument("--img-size", type=int, default=None, help="resolution (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, alternating this repo and the baseline; the median round is reported")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:1")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="this repo's autocast")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training (slow warm-up)")
    p.add_argument("--workers", type=int, default=runtime.default_workers(), help="loader processes")
    p.add_argument("--time-to-accuracy", action="store_true",
                   help="only time training from launch to --target val top-1 (on --data-path at --img-size, "
                        "default the digits at 64 px): train.py's defaults against the tutorial's program")
    p.add_argument("--target", type=float, default=0.95, help="--time-to-accuracy: the val top-1 to reach")
    p.add_argument("--max-epochs", type=int, default=20, help="--time-to-accuracy: each run's epochs at most")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="--time-to-accuracy: a run per seed")
    p.add_argument("--startup", type=int, nargs="*", metavar="FILES",
                   help="only time the start of training on folders of FILES images (default 10000 100000 "
                        "1000000) against torchvision's plain start, and predict.py's memory on the first two")
    p.add_argument("--whole", action="store_true",
                   help="only time whole commands as a user runs them (train.py for 2 epochs on the digits at "
                        "64 px, predict.py over 15 batches of small JPEGs and on one image) against plain scripts, "
                        "and predict.py over --images JPEGs against ONNX Runtime on the exported file")
    p.add_argument("--images", type=int, default=1000,
                   help="--whole: the JPEGs that predict.py reads from best.pth and ONNX Runtime from its export "
                        "(0: leave that row out)")
    p.add_argument("--data-path", help="--whole, --time-to-accuracy: the folder to train on (default: the bundled digits)")
    p.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)  # a child process: see measure()
    p.add_argument("--photos", help=argparse.SUPPRESS)  # the folder the "folder" contenders predict
    p.add_argument("--tensor-memory", action="store_true", help=argparse.SUPPRESS)  # see tensor_memory()
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    ds = MyDataSet(paths, [0] * len(paths), transforms.build_transform(variant, img_size, train=True, scale=(0.25, 1)),
                   draft_size=transforms.train_draft_size(img_size, 0.25) if draft else None)
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
        model, info, transform, resize = model_files.load_model(weights, device=device)
    loader = torch.utils.data.DataLoader(predict.ImagePaths(paths, transform, transforms.eval_draft_size(resize)),
                                         batch_size=batch,
                                         num_workers=args.workers, collate_fn=predict.ImagePaths.collate)
    start = time.perf_counter()
    n = sum(1 for _ in predict.predict(predict.fast_path(model, device, False), loader, device, 5))
    return n / (time.perf_counter() - start)


def folder_rate_baseline(paths, args, device, batch):
    """The tutorial's way: open, transform and predict in the main process, torchvision eager fp32."""
    from PIL import Image
    model = baseline_model(args.model, device).eval()
    transform = getattr(torchvision.models, f"EfficientNet_{args.model.upper()}_Weights").IMAGENET1K_V1.transforms()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            model(x.to(device)).softmax(1).topk(5)
    return len(paths) / (time.perf_counter() - start)


# torchvision's plain start: ImageFolder, random_split, a DataLoader, one training step
PLAIN_START = """
import sys, torch, torchvision
from torchvision import transforms
data = torchvision.datasets.ImageFolder(sys.argv[1], transforms.Compose([
    transforms.RandomResizedCrop(64), transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
n_val = int(len(data) * 0.2)
train, val = torch.utils.data.random_split(data, [len(data) - n_val, n_val], torch.Generator().manual_seed(0))
loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, num_workers=int(sys.argv[2]))
model = torchvision.models.efficientnet_b0(num_classes=len(data.classes))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
images, labels = next(iter(loader))
torch.nn.functional.cross_entropy(model(images), labels).backward()
optimizer.step()
"""
# runs a script and ends its process the moment its first optimizer step is done
UNTIL_FIRST_STEP = ("import os, runpy, sys; from torch.optim.optimizer import register_optimizer_step_post_hook; "
                    "register_optimizer_step_post_hook(lambda *a: os._exit(0)); "
                    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


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


Ran = namedtuple("Ran", "seconds rss output")


def on_pty(command):
    """Ran(seconds from launch to exit, peak resident MiB of the process, what it printed) for
    `command` run with a pseudo-terminal as its stdout and stderr, as a user at a terminal starts it."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output, status, usage = b"", None, None
    while status is None:  # keep reading, so that the process never waits on a full terminal
        if select.select([master], [], [], 0.05)[0]:
            try:
                output += os.read(master, 65536)
            except OSError:
                pass
        pid, code, used = os.wait4(proc.pid, os.WNOHANG)
        if pid:  # its own usage and its reaped children's (data loader workers): the largest process
            status, usage = os.waitstatus_to_exitcode(code), used
    seconds = time.perf_counter() - start
    proc.returncode = status
    try:
        os.killpg(proc.pid, 9)  # data loader workers that outlived an os._exit
    except ProcessLookupError:
        pass
    os.close(master)
    if status != 0:
        sys.exit(f"benchmark: {' '.join(command[:4])} ... exited {status}:\n{output.decode(errors='replace')[-2000:]}")
    return Ran(seconds, usage.ru_maxrss / 1024, output.decode(errors="replace"))


def startup(args):
    """Launch to the first training step: train.py against torchvision's plain start, whole
    processes on a pseudo-terminal, taking turns, median of --rounds; then predict.py's peak
    memory over the folder, which must not grow with it."""
    sizes = args.startup or [10_000, 100_000, 1_000_000]
    print(f"{'launch to first training step':<40} {'train.py':>9} {'torchvision':>12} {'ratio':>7}")
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = link_folder(tmp, n)
            with open(os.path.join(tmp, "plain_start.py"), "w") as f:
                f.write(PLAIN_START)
            times = {"train.py": [], "torchvision": []}
            for r in range(args.rounds):
                times["torchvision"].append(on_pty([sys.executable, "-c", UNTIL_FIRST_STEP, f.name, data,
                                                    str(args.workers)])[0])
                times["train.py"].append(on_pty([sys.executable, "-c", UNTIL_FIRST_STEP, os.path.join(HERE, "train.py"),
                                                 "--data-path", data, "--img-size", "64", "--workers",
                                                 str(args.workers), "--output-dir", os.path.join(tmp, f"run{r}")])[0])
            ours, base = (sorted(t)[len(t) // 2] for t in (times["train.py"], times["torchvision"]))
            rows.append((f"start-up, {n:,} files", ours, base, ours / base, "s"))
            print(f"{f'{n:,} files (s)':<40} {ours:>9.1f} {base:>12.1f} {ours / base:>6.2f}x", flush=True)
            if n <= 100_000:
                rows.append((f"predict.py peak RSS, {n:,} files", predict_memory(tmp, data, args), None, None, "MiB"))
                print(f"{f'predict.py over them: peak RSS (MiB)':<40} {rows[-1][1]:>9.0f}", flush=True)
    return rows


def predict_memory(tmp, data, args):
    """Peak resident MiB of predict.py writing --csv for every image in `data` with a 32 px model."""
    from types import SimpleNamespace
    import checkpoint
    classes = sorted(os.listdir(data))
    model = create_model("b0", len(classes), verbose=False)
    meta = checkpoint.make_meta(SimpleNamespace(model="b0", img_size=32), classes, VARIANTS["b0"], model.bn_eps)
    weights = os.path.join(tmp, "best.pth")
    checkpoint.save_best(weights, model, meta, 1, 0.0)
    return on_pty([sys.executable, os.path.join(HERE, "predict.py"), data, "--weights", weights, "--csv",
                   os.path.join(tmp, "predictions.csv"), "--workers", str(args.workers), "--batch-size", "64"])[1]


# The plain scripts that the whole commands are timed against, each run as its own process.
# The tutorial's training program, on torchvision's B0: its split, dataset, transforms, workers,
# SGD with a cosine schedule, tqdm bars, a state_dict saved every epoch.
TUTORIAL_TRAIN = """
import math, os, random, sys, time
import torch, torchvision
from PIL import Image
from torchvision import transforms
from tqdm import tqdm
root, epochs, size, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
random.seed(0)  # the split
torch.manual_seed(int(sys.argv[6]) if len(sys.argv) > 6 else 0)
classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
train, val = [], []
for label, c in enumerate(classes):
    files = sorted(os.path.join(root, c, f) for f in os.listdir(os.path.join(root, c)))
    held = set(random.sample(files, int(len(files) * 0.2)))
    train += [(f, label) for f in files if f not in held]
    val += [(f, label) for f in files if f in held]
class Images(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform
    def __len__(self):
        return len(self.items)
    def __getitem__(self, i):
        return self.transform(Image.open(self.items[i][0]).convert("RGB")), self.items[i][1]
normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), normalize])
val_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), normalize])
nw = min(os.cpu_count(), batch, 8)
train_loader = torch.utils.data.DataLoader(Images(train, train_tf), batch_size=batch, shuffle=True, num_workers=nw)
val_loader = torch.utils.data.DataLoader(Images(val, val_tf), batch_size=batch, num_workers=nw)
model = torchvision.models.efficientnet_b0(num_classes=len(classes))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda x: (1 + math.cos(x * math.pi / epochs)) / 2 * 0.99 + 0.01)
os.makedirs(out)
for epoch in range(epochs):
    start = time.perf_counter()
    model.train()
    bar = tqdm(train_loader, file=sys.stdout)
    for images, labels in bar:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        bar.desc = f"[epoch {epoch}] loss {loss.item():.3f}"
    scheduler.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in tqdm(val_loader, file=sys.stdout):
            correct += (model(images).argmax(1) == labels).sum().item()
    torch.save(model.state_dict(), os.path.join(out, f"model-{epoch}.pth"))
    print(f"epoch {epoch} accuracy {correct / len(val):.4f} seconds {time.perf_counter() - start:.2f}")
"""
# A plain loop over a folder: torchvision's B0 and its eval transform, batches of 32, main process.
PLAIN_PREDICT_FOLDER = """
import os, sys, torch, torchvision
from PIL import Image
model = torchvision.models.efficientnet_b0()
model.load_state_dict(torch.load(sys.argv[1]))
model.eval()
transform = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
paths = sorted(os.path.join(sys.argv[2], f) for f in os.listdir(sys.argv[2]))
with torch.no_grad():
    for i in range(0, len(paths), 32):
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + 32]])
        for path, p in zip(paths[i:i + 32], model(x).softmax(1)):
            print(path, p.argmax().item(), f"{p.max():.3f}")
"""
# The six lines that predict one image.
PLAIN_PREDICT_ONE = """
import sys, torch, torchvision
from PIL import Image
model = torchvision.models.efficientnet_b0(); model.load_state_dict(torch.load(sys.argv[1])); model.eval()
x = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()(Image.open(sys.argv[2]).convert("RGB"))
with torch.no_grad(): p = model(x[None]).softmax(1)[0]
print(p.argmax().item(), f"{p.max():.3f}")
"""


def whole(args):
    """Whole commands as a user runs them, launch to exit on a pseudo-terminal, against the plain
    scripts above; the two take turns, median of --rounds. Speed-up = baseline seconds / ours."""
    data = args.data_path or os.path.join(HERE, "data", "digits")
    size, batch = str(args.img_size or 64), str(args.batch_size)
    print(f"{'whole command (seconds, median of ' + str(args.rounds) + ')':<60} {'baseline':>9} {'this repo':>10} "
          f"{'speed-up':>9}")
    rows = []

    def row(name, base, ours):
        rows.append((name, base, ours, base / ours))
        print(f"{name:<60} {base:>9.1f} {ours:>10.1f} {base / ours:>8.2f}x", flush=True)

    def median(values):
        return sorted(values)[len(values) // 2]

    with tempfile.TemporaryDirectory() as tmp:
        scripts = {}
        for name, text in (("tutorial_train", TUTORIAL_TRAIN), ("plain_folder", PLAIN_PREDICT_FOLDER),
                           ("plain_one", PLAIN_PREDICT_ONE)):
            scripts[name] = os.path.join(tmp, name + ".py")
            with open(scripts[name], "w") as f:
                f.write(text)
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        paths = write_photos(photos, 15 * args.batch_size, (96, 96))
        weights = os.path.join(tmp, "b0.pth")
        torch.save(baseline_model("b0", "cpu").state_dict(), weights)  # the layout of torchvision's download

        base, ours, base_epoch, ours_epoch = [], [], [], []
        for r in range(args.rounds):
            ran = on_pty([sys.executable, scripts["tutorial_train"], data, "2", size, batch, os.path.join(tmp, f"t{r}")])
            base.append(ran.seconds)
            base_epoch.append(sum(float(line.split()[-1]) for line in ran.output.splitlines()
                                  if line.startswith("epoch ") and " seconds " in line) / 2)
            run = os.path.join(tmp, f"r{r}")
            ours.append(on_pty([sys.executable, os.path.join(HERE, "train.py"), "--data-path", data, "--epochs", "2",
                                "--img-size", size, "--batch-size", batch, "--output-dir", run]).seconds)
            with open(os.path.join(run, "metrics.csv"), newline="") as f:
                ours_epoch.append(sum(float(r["epoch_seconds"]) for r in csv.DictReader(f)) / 2)
        row(f"train.py, 2 epochs on {os.path.basename(os.path.normpath(data))} at {size} px, batch {batch}",
            median(base), median(ours))
        row("  the same, seconds per epoch", median(base_epoch), median(ours_epoch))

        predict = os.path.join(HERE, "predict.py")
        commands = {
            f"predict.py over {len(paths)} 96x96 JPEGs (eval 256/224)": (
                [scripts["plain_folder"], weights, photos], [predict, photos, "--weights", weights]),
            "predict.py on one image, launch to answer": (
                [scripts["plain_one"], weights, paths[0]], [predict, paths[0], "--weights", weights]),
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
                subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "--weights", weights, "--format",
                                "onnx", "--dynamic-batch", "--output", onnx], check=True, capture_output=True)
                ours = [predict, large, "--weights", weights]
                commands[f"predict.py over {args.images} 500x375 JPEGs at 224 px vs ONNX Runtime"] = (
                    [predict, large, "--weights", onnx], ours)
                commands["  the same, predict.py --amp"] = ([predict, large, "--weights", onnx], ours + ["--amp"])
        for name, (plain, repo) in commands.items():
            base, ours = [], []
            for _ in range(args.rounds):
                base.append(on_pty([sys.executable, *plain]).seconds)
                ours.append(on_pty([sys.executable, *repo]).seconds)
            row(name, median(base), median(ours))
    return rows


def time_to_accuracy(args):
    """Launch to the moment best.pth first reaches --target val top-1: train.py's defaults against
    the tutorial's training program (torchvision's B0, its split, SGD, its cosine schedule), each
    for at most --max-epochs, a run per --seeds, the two taking turns. A run is stopped (SIGTERM to
    its process group) once it gets there. Returns {(name, seed): (seconds or None, epoch, [top-1])}."""
    data = args.data_path or os.path.join(HERE, "data", "digits")
    size, epochs = str(args.img_size or 64), str(args.max_epochs)
    name = os.path.basename(os.path.normpath(data))
    print(f"time to val top-1 {args.target} on {name} at {size} px, B0 from scratch, batch 16, at most {epochs} epochs, "
          f"launch to best.pth; {torch.get_num_threads()} threads")
    print(f"{'seed':<6} {'tutorial program':>26} {'train.py defaults':>26} {'speed-up':>9}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "tutorial_train.py")
        with open(script, "w") as f:
            f.write(TUTORIAL_TRAIN)
        for seed in args.seeds:
            log, run = os.path.join(tmp, f"tutorial-{seed}.log"), os.path.join(tmp, f"run-{seed}")
            commands = {  # each with the reader of its val top-1 per epoch so far
                "tutorial": ([sys.executable, script, data, epochs, size, "16", os.path.join(tmp, f"t{seed}"),
                              str(seed)], log, lambda: tutorial_top1(log)),
                "train.py": ([sys.executable, os.path.join(HERE, "train.py"), "--data-path", data, "--img-size", size,
                              "--epochs", epochs, "--seed", str(seed), "--output-dir", run],
                             os.path.join(tmp, f"train-{seed}.log"), lambda: train_top1(run)),
            }
            for who, (command, output, top1) in commands.items():
                results[who, seed] = run_to_accuracy(command, output, top1, args.target)
            t, r = results["tutorial", seed], results["train.py", seed]
            cell = lambda x: (f"{x[0]:.1f} s (epoch {x[1]})" if x[0] is not None  # noqa: E731
                              else f"not in {epochs} epochs ({max(x[2], default=0):.3f})")
            ratio = f"{t[0] / r[0]:.2f}x" if t[0] is not None and r[0] is not None else "-"
            print(f"{seed:<6} {cell(t):>26} {cell(r):>26} {ratio:>9}", flush=True)
    return results


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


def inputs(args, device):
    """The benchmark's batch: random images at the chosen size and random labels, seeded."""
    torch.manual_seed(0)
    size = args.img_size or VARIANTS[args.model].train_size
    return (torch.randn(args.batch_size, 3, size, size, device=device),
            torch.randint(0, 1000, (args.batch_size,), device=device))


def train_step(args, device, x, y, torchvision_model=False, tutorial=False, compile=False, grad_checkpointing=False):
    """A training step as a function: torchvision's model or this repo's; the tutorial's settings
    (fp32, NCHW, SGD) or train.py's default ones (channels-last, recipe.py's AdamW, --amp auto's autocast)."""
    if torchvision_model:
        model = baseline_model(args.model, device)
    else:
        model = create_model(args.model, grad_checkpointing=grad_checkpointing).to(device)
    model.train()
    if tutorial:
        sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        return train_step_fn(model, sgd, x, y, None, False)
    model = model.to(memory_format=torch.channels_last)
    adamw = recipe.build_optimizer(argparse.Namespace(optimizer="adamw", lr=1e-3, weight_decay=0.05), model)
    return train_step_fn(torch.compile(model) if compile else model, adamw, x, y,
                         runtime.amp_dtype(args.amp, device), True)


def infer_step(args, device, x, torchvision_model=False, bf16=False):
    """Inference as a function: torchvision's model eager in fp32, or predict.py's path."""
    if torchvision_model:
        return infer_fn(baseline_model(args.model, device).eval(), x)
    import predict
    model = fuse_bn(create_model(args.model).to(device, memory_format=torch.channels_last))
    # predict.py --amp's dtype
    amp = torch.float16 if device.type == "cuda" and not runtime.native_bf16(device) else torch.bfloat16
    return infer_fn(predict.fast_path(model, device, bf16), x.contiguous(memory_format=torch.channels_last),
                    amp if bf16 else None)


def infer_exported(args, device, x, fmt):
    """predict.py's path through an exported file (export.py, dynamic batch): the file exported on
    the CPU, as export.py does, then loaded onto `device`: the ExportedProgram, or ONNX Runtime on
    the CPU."""
    import export
    model = fuse_bn(create_model(args.model)).eval()
    with tempfile.TemporaryDirectory() as folder:  # both loaders read the whole file in
        path = os.path.join(folder, f"model.{fmt}")
        export.save(export.export_program(model, x.shape[-1], True), fmt, path)
        loaded = exported.ExportedModel(path, True, device)
    return infer_fn(loaded, x)


# One row per contender, each timed in a fresh process of its own so that none inherits another's
# allocator state. kind: "train" and "infer" time steps of `run`'s function, "folder" calls `run`
# for images/s over a folder of JPEGs; glibc: keep the C allocator's defaults (the baselines),
# else the settings this repo's scripts use (keep_freed_memory); rows: what the report shows,
# (label, the contender compared with, "rate" | "resident" | "tensor" memory); only: the option of
# benchmark.py that this contender needs (it then runs in the first round only).
Contender = namedtuple("Contender", "kind run glibc rows only", defaults=(False, (), None))
TUTORIAL = "baseline"  # torchvision's model in the tutorial's loop: fp32, NCHW, SGD
CONTENDERS = {
    "baseline": Contender("train", partial(train_step, torchvision_model=True, tutorial=True), glibc=True),
    "default-glibc": Contender("train", train_step, glibc=True, rows=[
        ("peak resident memory, without keep_freed_memory", TUTORIAL, "resident")]),
    "same-settings": Contender("train", partial(train_step, tutorial=True), rows=[
        ("train step, same settings (fp32 NCHW, SGD)", TUTORIAL, "rate")]),
    "default": Contender("train", train_step, rows=[
        ("train step: train.py default vs tutorial loop", TUTORIAL, "rate"),
        ("train step: default vs default w/o keep_freed_memory", "default-glibc", "rate"),
        ("peak tensor memory of a training step", TUTORIAL, "tensor"),
        ("peak resident memory of the training process", TUTORIAL, "resident")]),
    "grad-checkpointing": Contender("train", partial(train_step, grad_checkpointing=True), rows=[
        ("train step, --grad-checkpointing", TUTORIAL, "rate"),
        ("peak tensor memory, --grad-checkpointing", TUTORIAL, "tensor")]),
    "compile": Contender("train", partial(train_step, compile=True), only="compile", rows=[
        ("train step, --compile (warm-up {warmup:.0f}s)", TUTORIAL, "rate")]),
    "infer-baseline": Contender("infer", partial(infer_step, torchvision_model=True), glibc=True),
    "infer": Contender("infer", infer_step, rows=[("inference: predict.py vs torchvision eager", "infer-baseline", "rate")]),
    "infer-bf16": Contender("infer", partial(infer_step, bf16=True), rows=[
        ("inference, predict.py --amp (bf16)", "infer-baseline", "rate")]),
    "infer-pt2": Contender("infer", partial(infer_exported, fmt="pt2"), rows=[
        ("inference: export.py .pt2, loaded program", "infer-baseline", "rate")]),
    "infer-onnx": Contender("infer", partial(infer_exported, fmt="onnx"), rows=[
        ("inference: export.py .onnx, ONNX Runtime", "infer-baseline", "rate")]),
    "folder-baseline": Contender("folder", folder_rate_baseline, glibc=True),
    "folder": Contender("folder", folder_rate, rows=[
        ("predict.py over {photos} JPEGs vs plain torchvision loop", "folder-baseline", "rate")]),
}


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(which, args, device):
    """In the contender's own process: {"rate": images/s over args.steps steps after a warm-up
    step, "warmup": seconds of that first step, "peak": MiB the steps added at most: the
    process's peak resident size (CPU; allocator caching included) or CUDA's peak allocation,
    above the level before them}."""
    contender = CONTENDERS[which]
    if device.type == "cpu" and not contender.glibc:
        runtime.keep_freed_memory()
    runtime.configure_cuda(device, train=contender.kind == "train")
    if contender.kind == "folder":
        paths = sorted(os.path.join(args.photos, p) for p in os.listdir(args.photos))
        return {"rate": contender.run(paths, args, device, args.batch_size)}
    x, y = inputs(args, device)
    step = contender.run(args, device, x, y) if contender.kind == "train" else contender.run(args, device, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss()
    start = time.perf_counter()
    step()
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    rate = args.batch_size * args.steps / (time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"rate": rate, "warmup": warmup, "peak": peak / 2**20}


def tensor_memory(which, args, device):
    """MiB one steady-state training step adds at its peak to what lives before it: tensors only,
    as CUDA's max_memory_allocated counts them. On a CPU the process runs with a fixed, small
    mmap threshold (see run_contender) and without keep_freed_memory, so every freed block goes
    back to the system at once and the resident size follows the live tensors; the peak is the
    kernel's high-water mark, reset just before the step."""
    runtime.configure_cuda(device, train=True)
    x, y = inputs(args, device)
    step = CONTENDERS[which].run(args, device, x, y)
    step()  # warm-up: optimizer state, first-call allocations
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    step()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return (peak - base) / 2**20


def run_contender(which, args, photos=None, memory=False):
    """measure() in a new process with the same options; its result."""
    command = [sys.executable, os.path.abspath(__file__), "--contender", which, "--model", args.model,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--amp", args.amp,
               "--device", args.device, "--workers", str(args.workers)]
    command += ["--img-size", str(args.img_size)] if args.img_size else []
    command += ["--photos", photos] if photos else []
    command += ["--tensor-memory"] if memory else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if memory else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"benchmark contender '{which}' failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args):
    device = runtime.choose_device(args.device)
    variant = VARIANTS[args.model]
    b, size = args.batch_size, args.img_size or variant.train_size
    print(f"EfficientNet-{args.model.upper()} at {size}px, batch {b}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}, this repo's autocast: {runtime.amp_dtype(args.amp, device) or 'off'}; each contender "
          f"in its own process, median of {args.rounds} rounds of {args.steps} steps")
    rows = []

    def row(name, ours, base, unit):
        rows.append((name, ours, base, ours / base, unit))
        print(f"{name:<52} {ours:>10.1f} {base:>10.1f} {unit:<6} {ours / base:>6.2f}x", flush=True)

    chosen = {name: c for name, c in CONTENDERS.items() if c.only is None or getattr(args, c.only)}
    import export
    if export.missing_onnx_packages() or importlib.util.find_spec("onnxruntime") is None:
        print("(no ONNX row: pip install -r requirements-export.txt for it)")
        chosen.pop("infer-onnx")
    weighed = {n for name, c in chosen.items() for _, versus, metric in c.rows if metric == "tensor" for n in (name, versus)}
    with tempfile.TemporaryDirectory() as photos:
        write_photos(photos, 10 * b, (500, 375))
        results = {}
        for round_ in range(args.rounds):  # the contenders take turns, so a slow spell hits all alike
            for name, c in chosen.items():
                if c.only is None or round_ == 0:
                    results.setdefault(name, []).append(run_contender(name, args, photos))
        memory = {name: run_contender(name, args, memory=True) for name in weighed}
    median = {name: {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
              for name, runs in results.items()}
    figure = {"rate": lambda name: median[name]["rate"], "resident": lambda name: median[name]["peak"],
              "tensor": lambda name: memory[name]}

    print(f"{'measurement':<52} {'this repo':>10} {'baseline':>10} {'unit':<6} {'ratio':>7}")
    for name, c in chosen.items():
        for label, versus, metric in c.rows:
            row(label.format(photos=10 * b, **median[name]), figure[metric](name), figure[metric](versus),
                "img/s" if metric == "rate" else "MiB")

    # the loader alone, on phone-sized JPEGs, against the training step it feeds
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in ((1600, 1200), (500, 375)):
            paths = write_photos(tmp, 2 * b, (w, h))
            full = loader_rate(paths, variant, size, b, args.workers, draft=False)
            drafted = loader_rate(paths, variant, size, b, args.workers, draft=True)
            row(f"loader {w}x{h} JPEG, {args.workers} workers vs train step", drafted, median["default"]["rate"], "img/s")
            row(f"loader {w}x{h} JPEG: draft decode vs full", drafted, full, "img/s")

    return rows


def cpu_name():
    """The CPU as lscpu names it, and whether it has AMX or AVX512-BF16 (bf16 speed hangs on them):
    every figure depends on it, so each report starts with it."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: (re.findall(rf"^{key}\s*:\s*(.*)$", info, re.M) or [""])[0].strip()  # noqa: E731
    flags = set(field("flags").split())
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags else "no native bf16"
    return f"{field('model name') or platform.machine()} ({os.cpu_count()} CPUs, {bf16})"


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if not args.contender:
        print(f"CPU: {cpu_name()}")
    try:
        if args.startup is not None:
            startup(args)
        elif args.whole:
            whole(args)
        elif args.time_to_accuracy:
            time_to_accuracy(args)
        elif args.contender:
            device = runtime.choose_device(args.device)
            print(json.dumps(tensor_memory(args.contender, args, device) if args.tensor_memory
                             else measure(args.contender, args, device)))
        else:
            main(args)
    except cli.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
