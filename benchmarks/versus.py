"""benchmark.py --versus NAME: two variants on this machine, --model in the baseline column and
NAME in this repo's, each on this repo's paths: predict.py's (folded BatchNorm, the fast CPU path,
inference mode) at the variant's evaluation size and train.py's training step (channels-last, the
lean layers, AdamW, --amp auto) at its training size, or both at --img-size. The question it
answers: what similar accuracy costs in each family, e.g. EfficientNetV2-S (84.2 % ImageNet
top-1, trained at 300 px, evaluated at 384) against B4 (83.4 %, 380 px).

The two share one process and take turns, round after round, so that a slow spell of a shared
machine hits both; the median round counts."""
import argparse
import time

import torch

import runtime
from benchmarks.measuring import Table, median, sync
from benchmarks.steps import infer_step, train_step
from model import VARIANTS, title


def sizes(name, img_size):
    """(training size, evaluation size) of variant `name`: its own, or --img-size for both."""
    v = VARIANTS[name]
    return (img_size, img_size) if img_size else (v.train_size, v.eval_crop)


def steps_of(name, args, device):
    """{"predict": step, "train": step} for variant `name`, each a function of no arguments that
    handles one batch, built as steps.py builds this repo's contenders."""
    train_size, eval_size = sizes(name, args.img_size)
    torch.manual_seed(0)
    flags = argparse.Namespace(model=name, amp=args.amp)
    x = torch.randn(args.batch_size, 3, train_size, train_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    return {"predict": infer_step(flags, device, torch.randn(args.batch_size, 3, eval_size, eval_size, device=device)),
            "train": train_step(flags, device, x, y)}


def timed(step, n, device):
    """Seconds per call of `step`, over n calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def run(args):
    device = runtime.choose_device(args.device)
    if device.type == "cpu":
        runtime.keep_freed_memory()
    runtime.configure_cuda(device, train=True)
    base, other = args.model, args.versus
    print(f"{title(base)} (baseline column) against {title(other)} (this repo's column), batch {args.batch_size}, "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, autocast in training: "
          f"{runtime.amp_dtype(args.amp, device) or 'off'}; both on this repo's paths, taking turns, median of "
          f"{args.rounds} rounds of {args.steps} steps")
    built = {name: steps_of(name, args, device) for name in (base, other)}
    for fns in built.values():  # first calls: oneDNN's kernels, the optimizer's state
        for step in fns.values():
            step()
    seconds = {(name, kind): [] for name in built for kind in ("predict", "train")}
    for _ in range(args.rounds):
        for kind in ("predict", "train"):
            for name, fns in built.items():
                seconds[name, kind].append(timed(fns[kind], args.steps, device))
    rate = {key: args.batch_size / median(values) for key, values in seconds.items()}
    table = Table("measurement")
    (base_train, base_eval), (other_train, other_eval) = sizes(base, args.img_size), sizes(other, args.img_size)
    table.row(f"predict, batch of {args.batch_size} ({base} at {base_eval} px, {other} at {other_eval} px)",
              rate[base, "predict"], rate[other, "predict"], "img/s")
    table.row(f"training step ({base} at {base_train} px, {other} at {other_train} px)",
              rate[base, "train"], rate[other, "train"], "img/s")
    return table.rows
