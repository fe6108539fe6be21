"""Speed and memory of this repo's training and prediction paths against the tutorial's and plain
torchvision's, measured in one run on this machine, as ratios. A run measures one thing, each
in a file of benchmarks/:

    python benchmark.py                      # steps.py: training and inference steps, the loader;
                                             # B0 at 224 px, batch 32
    python benchmark.py --model b3 --img-size 300 --batch-size 16 --device cuda
    python benchmark.py --time-to-accuracy   # time_to_accuracy.py: launch to 95 % val top-1 on the digits
    python benchmark.py --whole              # whole.py: train.py and predict.py, launch to exit
    python benchmark.py --startup 10000      # startup.py: launch to the first step on 10,000 files
    python benchmark.py --loader --data-path DIR --workers 1   # loader.py: the data pipeline, img/s per core
    python benchmark.py --device cuda --quick   # quick.py: what a GPU does with this repo, in minutes
    python benchmark.py --model b4 --versus v2_s --batch-size 8   # versus.py: two variants, predict and train
    python benchmark.py --serve --images 200  # serve.py: requests/s and latency at 1 and 8 clients, batched or not

Each prints the CPU (every figure hangs on it), a line on what it compares, then its rows in one
format (benchmarks/measuring.py's Table): name, the baseline's figure, this repo's, the unit and
the ratio. The programs the baselines run are files of benchmarks/ too, runnable by themselves.
"""
import argparse
import json
import os
import platform
import re
import sys

import cli
import errors
import runtime
from benchmarks import loader, quick, serve, startup, steps, time_to_accuracy, versus, whole
from model import VARIANTS


def get_args_parser():
    p = cli.ArgumentParser(description="Benchmark this repo against plain torchvision.")
    p.add_argument("--model", default="b0", choices=list(VARIANTS), help="variant")
    p.add_argument("--img-size", type=int, default=None, help="resolution (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 32; --quick: 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, alternating this repo and the baseline; the median round is reported")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:1")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="this repo's autocast")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training (slow warm-up)")
    p.add_argument("--workers", type=int, default=runtime.default_workers(), help="loader processes")
    p.add_argument("--time-to-accuracy", action="store_true",
                   help="only time training from launch to --target val top-1 (on --data-path at --img-size, "
                        "default the digits at 64 px): train.py's defaults against the tutorial's program "
                        "(benchmarks/time_to_accuracy.py)")
    p.add_argument("--target", type=float, default=0.95, help="--time-to-accuracy: the val top-1 to reach")
    p.add_argument("--max-epochs", type=int, default=20, help="--time-to-accuracy: each run's epochs at most")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="--time-to-accuracy: a run per seed")
    p.add_argument("--startup", type=int, nargs="*", metavar="FILES",
                   help="only time the start of training on folders of FILES images (default 10000 100000 "
                        "1000000) against torchvision's plain start, and predict.py's memory on the first two "
                        "(benchmarks/startup.py)")
    p.add_argument("--whole", action="store_true",
                   help="only time whole commands as a user runs them (train.py for 2 epochs on the digits at "
                        "64 px, predict.py over 15 batches of small JPEGs and on one image) against plain scripts, "
                        "and predict.py over --images JPEGs against ONNX Runtime on the exported file "
                        "(benchmarks/whole.py)")
    p.add_argument("--loader", action="store_true",
                   help="only time the data pipeline, training's and evaluation's, against the tutorial's, in images "
                        "per second per core (--workers of them; --data-path, default 256 photos of 500x375 px) "
                        "(benchmarks/loader.py)")
    p.add_argument("--quick", action="store_true",
                   help="what a GPU does with this repo in a few minutes, with --device cuda: training steps at "
                        "batch 16 and 256, a profile of one, the loader, whole train.py against the tutorial's loop "
                        "(and --timm-train's) (benchmarks/quick.py)")
    p.add_argument("--versus", choices=list(VARIANTS), metavar="MODEL",
                   help="only time predict.py's and train.py's steps of --model against MODEL's (e.g. --model b4 "
                        "--versus v2_s), each at its own sizes or both at --img-size (benchmarks/versus.py)")
    p.add_argument("--serve", action="store_true",
                   help="only time serve.py under load: requests/s and p50/p95 latency at 1 and 8 clients, batched "
                        "against --max-batch 1, and predict.py's path over the same --images JPEGs of 500x375 at "
                        "--img-size (benchmarks/serve.py)")
    p.add_argument("--timm-train", metavar="PATH", help="--quick: timm's train.py, to time against train.py")
    p.add_argument("--images", type=int, default=1000,
                   help="--whole: the JPEGs that predict.py reads from best.pth and ONNX Runtime from its export "
                        "(0: leave that row out); --serve: the JPEGs of each pass")
    p.add_argument("--data-path", help="--whole, --time-to-accuracy: the folder to train on (default: the bundled "
                                       "digits); --loader: the images to read")
    # a child process of the default mode, measuring one contender: see steps.run_contender
    p.add_argument("--contender", choices=list(steps.CONTENDERS), help=argparse.SUPPRESS)
    p.add_argument("--photos", help=argparse.SUPPRESS)  # the folder the "folder" contenders predict
    p.add_argument("--tensor-memory", action="store_true", help=argparse.SUPPRESS)  # see steps.tensor_memory
    return p


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


def mode(args):
    """The module of benchmarks/ that the flags ask for; the default table without any."""
    if args.startup is not None:
        return startup
    if args.whole:
        return whole
    if args.time_to_accuracy:
        return time_to_accuracy
    if args.loader:
        return loader
    if args.quick:
        return quick
    if args.versus:
        return versus
    if args.serve:
        return serve
    return steps


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if args.batch_size is None:
        args.batch_size = 256 if args.quick else 32
    try:
        if args.contender:  # its parent reads the last line it prints, a JSON object, and nothing else
            device = runtime.choose_device(args.device)
            print(json.dumps(steps.tensor_memory(args.contender, args, device) if args.tensor_memory
                             else steps.measure(args.contender, args, device)))
        else:
            if not args.quick:  # it names the device once it has checked it
                print(f"CPU: {cpu_name()}")
            mode(args).run(args)
    except errors.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
