"""benchmark.py --device cuda --quick: what a GPU does with this repo, in one command of a few
minutes, each row printed as soon as it is measured (a run cut short still tells something):

    python benchmark.py --device cuda --quick [--timm-train PATH/train.py]

1. the GPU, torch, CUDA and cuDNN;
2. the model alone: a training step of B0 at 224 px, batch 16 and 256, torchvision's model in the
   tutorial's loop (fp32, NCHW, SGD) against train.py's (channels-last, bf16 autocast, AdamW);
3. where one step's time goes: torch.profiler's 10 ops with the most GPU time, and the host's
   time to launch the step;
4. the loader alone, 8 workers and all of them, against the tutorial's pipeline;
5. whole commands, launch to exit, on synthetic JPEGs at batch 256: train.py for one epoch
   against the tutorial's loop and, given --timm-train, timm's train.py on the same folder.
--img-size and --batch-size change the sizes (a smoke run on a CPU: --device cpu --quick
--img-size 32 --batch-size 4)."""
import os
import subprocess
import sys
import tempfile
import time

import torch

import runtime
from benchmarks import loader, steps
from benchmarks.measuring import ROOT, Table, peer, sync, write_photos

SMALL_BATCH = 16


def step_rate(step, batch, device, count=10):
    """Images per second of `step` over `count` steps, after two for warm-up (cuDNN's autotuning)."""
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    sync(device)
    return batch * count / (time.perf_counter() - start)


def model_steps(args, device, table):
    for batch in dict.fromkeys((SMALL_BATCH, args.batch_size)):  # once each
        args.batch_size, keep = batch, args.batch_size
        x, y = steps.inputs(args, device)
        base = step_rate(steps.train_step(args, device, x, y, torchvision_model=True, tutorial=True), batch, device)
        ours = step_rate(steps.train_step(args, device, x, y), batch, device)
        table.row(f"train step, model only, batch {batch}: train.py vs the tutorial's", base, ours, "img/s")
        args.batch_size = keep
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile(args, device):
    """The ops of one training step with the most device time, and the host's time to launch it."""
    x, y = steps.inputs(args, device)
    step = steps.train_step(args, device, x, y)
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    step()
    launched = time.perf_counter() - start
    sync(device)
    whole = time.perf_counter() - start
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"one training step at batch {args.batch_size}: {1000 * whole:.1f} ms, of which the host took "
          f"{1000 * launched:.1f} ms to launch it; its 10 ops with the most {key.split('_')[0].upper()} time:")
    print(prof.key_averages().table(sort_by=key, row_limit=10), flush=True)


def loaders(args, table, tmp):
    paths = write_photos(tmp, 4 * args.batch_size, (500, 375))
    ours, _ = loader.pipelines_of_this_repo(paths, args.img_size)
    theirs, _ = (loader.Images([(p, 0) for p in paths], tf) for tf in loader.pipelines(args.img_size))
    cpus = runtime.usable_cpus()
    for workers in sorted({min(8, cpus), cpus}):
        table.row(f"loader, {workers} workers: training pipeline vs the tutorial's", loader.rate(theirs, workers),
                  loader.rate(ours, workers, loader.my_dataset.MyDataSet.collate_fn), "img/s")


def timed(command):
    """Seconds from launch to exit of `command` (its output kept back); None where it failed."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {os.path.basename(command[1])} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        return None
    return time.perf_counter() - start


def whole_commands(args, table, tmp):
    # train/ as the tutorial's program and train.py read it (each splits off its own fifth to
    # validate on); train/ and val/ as timm's train.py reads them
    root = os.path.join(tmp, "jpegs")
    for split, n in (("train", 8 * args.batch_size), ("val", 2 * args.batch_size)):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c))
            write_photos(os.path.join(root, split, c), n, (500, 375))
    data, size, batch = os.path.join(root, "train"), str(args.img_size), str(args.batch_size)
    ours = timed([sys.executable, os.path.join(ROOT, "train.py"), "--data-path", data, "--epochs", "1", "--img-size",
                  size, "--batch-size", batch, "--device", args.device, "--precise-bn", "0", "--output-dir",
                  os.path.join(tmp, "run")])
    tutorial = timed([sys.executable, peer("tutorial_train.py"), "--data-path", data, "--output-dir",
                      os.path.join(tmp, "tutorial"), "--epochs", "1", "--img-size", size, "--batch-size", batch])
    table.row(f"train.py, 1 epoch of {16 * args.batch_size} JPEGs vs the tutorial's loop", tutorial, ours, "s")
    if not args.timm_train:
        print("timm's train.py: not compared (pass --timm-train PATH/train.py of a timm checkout, with timm installed)")
        return
    timm = timed([sys.executable, args.timm_train, "--data-dir", root, "--train-split", "train", "--val-split", "val",
                  "--model", "efficientnet_b0", "--epochs", "1", "--batch-size", batch, "--img-size", size, "--amp",
                  "--channels-last", "--output", os.path.join(tmp, "timm")])
    table.row("train.py, 1 epoch vs timm's train.py (--amp --channels-last)", timm, ours, "s")


def run(args):
    device = runtime.choose_device(args.device)
    if args.device.startswith("cuda") and device.type != "cuda":
        raise SystemExit("error: --quick --device cuda needs a CUDA GPU, and this machine has none")
    args.img_size = args.img_size or 224
    if device.type != "cuda":
        print(f"{device}: a smoke run of the GPU's measurements; {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}", flush=True)
    else:
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    runtime.configure_cuda(device, train=True)
    autocast = runtime.amp_dtype(args.amp, device)
    table = Table(f"{args.model.upper()} at {args.img_size} px on {device}, this repo's autocast {autocast or 'off'}")
    model_steps(args, device, table)
    profile(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        loaders(args, table, tmp)
        whole_commands(args, table, tmp)
    return table.rows
