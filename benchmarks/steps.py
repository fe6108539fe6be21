"""benchmark.py's default mode: a training step, inference, predict.py over a folder of JPEGs and
the loader, this repo's way against the tutorial's, in images/s and MiB.

Baseline: torchvision's efficientnet_bX in fp32, NCHW, eager, SGD (what the tutorial does).
This repo: train.py's default path (channels-last, bf16 autocast where fast, AdamW, the lean
BatchNormSiLU and SigmoidGate of activations.py) and predict.py's path (BatchNorm folded into the
convs, channels-last, gates in place, inference mode). Each contender is timed in a process of its
own (`benchmark.py --contender NAME`, which calls measure()), so that none inherits another's
allocator state; the contenders take turns over the rounds, so that a slow spell hits all alike,
and the median round counts."""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from functools import partial

import torch
import torchvision

import exported
import model_files
import recipe
import runtime
import transforms
from benchmarks.measuring import ROOT, Table, rss, sync, write_photos
from inference import fuse_bn
from model import VARIANTS, create_model, title
from my_dataset import MyDataSet


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
    return infer_fn(predict.fast_path(model, device, bf16), x.contiguous(memory_format=torch.channels_last),
                    runtime.half_dtype(device) if bf16 else None)  # predict.py --amp's dtype


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
    n = sum(1 for _ in predict.predict(predict.fast_path(model, device, False), loader, device, 5,
                                       normalize=transform.normalize))
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


# One entry per contender, each timed in a fresh process of its own. kind: "train" and "infer" time
# steps of `run`'s function, "folder" calls `run` for images/s over a folder of JPEGs; glibc: keep
# the C allocator's defaults (the baselines), else the settings this repo's scripts use
# (keep_freed_memory); rows: what the table shows, (label, the contender compared with, "rate" |
# "resident" | "tensor" memory), in the table's order; only: the option of benchmark.py that this
# contender needs (it then runs in the first round only).
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
    """measure() (or tensor_memory()) in a new process with the same options; its result. The
    process is benchmark.py's own, with the hidden flag --contender."""
    command = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--contender", which, "--model", args.model,
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


def run(args):
    """The table: every contender's rows, then the loader's on two sizes of JPEG."""
    device = runtime.choose_device(args.device)
    variant = VARIANTS[args.model]
    b, size = args.batch_size, args.img_size or variant.train_size
    print(f"{title(args.model)} at {size}px, batch {b}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}, this repo's autocast: {runtime.amp_dtype(args.amp, device) or 'off'}; each contender "
          f"in its own process, median of {args.rounds} rounds of {args.steps} steps")

    chosen = {name: c for name, c in CONTENDERS.items() if c.only is None or getattr(args, c.only)}
    import export
    if export.missing_onnx_packages() or importlib.util.find_spec("onnxruntime") is None:
        print("(no ONNX row: pip install -r requirements-export.txt for it)")
        chosen.pop("infer-onnx")
    weighed = {n for name, c in chosen.items() for _, versus, metric in c.rows if metric == "tensor" for n in (name, versus)}
    with tempfile.TemporaryDirectory() as photos:
        write_photos(photos, 10 * b, (500, 375))
        results = {}
        for round_ in range(args.rounds):
            for name, c in chosen.items():
                if c.only is None or round_ == 0:
                    results.setdefault(name, []).append(run_contender(name, args, photos))
        memory = {name: run_contender(name, args, memory=True) for name in weighed}
    median = {name: {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
              for name, runs in results.items()}
    figure = {"rate": lambda name: median[name]["rate"], "resident": lambda name: median[name]["peak"],
              "tensor": lambda name: memory[name]}

    table = Table("measurement")
    for name, c in chosen.items():
        for label, versus, metric in c.rows:
            table.row(label.format(photos=10 * b, **median[name]), figure[metric](versus), figure[metric](name),
                      "img/s" if metric == "rate" else "MiB")

    # the loader alone, on phone-sized JPEGs, against the training step it feeds
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in ((1600, 1200), (500, 375)):
            paths = write_photos(tmp, 2 * b, (w, h))
            full = loader_rate(paths, variant, size, b, args.workers, draft=False)
            drafted = loader_rate(paths, variant, size, b, args.workers, draft=True)
            table.row(f"loader {w}x{h} JPEG, {args.workers} workers vs train step", median["default"]["rate"],
                      drafted, "img/s")
            table.row(f"loader {w}x{h} JPEG: draft decode vs full", full, drafted, "img/s")
    return table.rows
