"""Train an EfficientNet classifier on a folder of images (one sub-folder per class).

    python train.py --img-size 64 --epochs 6                      # B0 on the bundled digits
    python train.py --data-path data/flower_photos --model b0 --weights imagenet
    python train.py --resume weights/b0-flower_photos/last.pth    # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --data-path data/flower_photos

Each run writes to its own folder (default weights/<model>-<dataset>, then -2, -3, ...): best.pth,
last.pth, metrics.csv, curves.png, confusion_matrix.png, per_class.csv, class_indices.json.
"""
import signal
import sys

SIGNALLED = []  # the signals received: a stop the user asked for


def stop_while_loading(signum, frame):
    SIGNALLED.append(signum)
    sys.exit(130)


if __name__ == "__main__":  # Ctrl-C, SIGTERM or SIGHUP while the libraries load: stop quietly, nothing written yet
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_while_loading)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import namedtuple  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint  # noqa: E402
import cli  # noqa: E402
import errors  # noqa: E402
import model_files  # noqa: E402
import my_dataset  # noqa: E402
import outputs  # noqa: E402
import pretrained  # noqa: E402
import recipe  # noqa: E402
import reports  # noqa: E402
import runtime  # noqa: E402
import transforms  # noqa: E402
import utils  # noqa: E402
from errors import WeightsError  # noqa: E402
from model import VARIANTS, create_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# flags a resumed run may change; the others come from the run itself
RESUMABLE = ("epochs", "device", "workers", "data_path", "resume", "lr", "clip_grad", "amp", "patience",
             "tensorboard")
# what runs saved before these flags existed did; other new flags take their defaults on --resume
BEFORE_FLAG = {"drop_path": 0.2, "precise_bn": 0}


def get_args_parser():
    p = cli.ArgumentParser(description="Train EfficientNet B0-B7 on a folder of images.",
                           usage="%(prog)s [--data-path DIR] [--model b0..b7] [--weights imagenet|FILE] [--epochs N]\n"
                                 "                [--resume [FILE]] [--eval-only] [more flags, below]")
    data = p.add_argument_group("data")
    data.add_argument("--data-path", default=os.path.join(HERE, "data", "digits"), metavar="DIR",
                      help="folder with one sub-folder per class (or train/ and val/ folders of those)")
    data.add_argument("--val-rate", type=float, default=0.2, metavar="F",
                      help="fraction of each class held out for validation")
    data.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the data split and of training")
    data.add_argument("--balance", action="store_true",
                      help="draw every class equally often in training (for very unequal class folders)")

    model = p.add_argument_group("model")
    model.add_argument("--model", default="b0", choices=list(VARIANTS), help="EfficientNet variant")
    model.add_argument("--img-size", type=int, default=None, metavar="PX",
                       help="training resolution (default: the variant's, 224 for b0)")
    model.add_argument("--weights", default=None, metavar="imagenet|FILE",
                       help="start from these weights (default: none, training from scratch): imagenet for "
                            "torchvision's ImageNet weights of --model (downloaded once; other names in README), a "
                            "best.pth or last.pth, or a torchvision or tutorial state_dict file")
    model.add_argument("--dropout", type=float, default=None, metavar="P",
                       help="dropout before the classifier (default: the variant's, 0.2 for b0 to 0.5 for b7)")
    model.add_argument("--drop-path", type=float, default=0.0, metavar="P",
                       help="stochastic depth of the deepest block; the paper's 0.2 suits long runs on large data")
    model.add_argument("--freeze-layers", action="store_true",
                       help="train only the last conv block (features.top) and the classifier")

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30, metavar="N", help="number of epochs to train")
    optim.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per step on each process")
    optim.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw", "rmsprop"], help="optimizer")
    optim.add_argument("--lr", type=float, default=None, metavar="X",
                       help="peak learning rate (default: adamw 1e-3, sgd 0.02, rmsprop 1e-3 for a global batch of "
                            "16, a quarter of that with --weights; scale it with the batch)")
    optim.add_argument("--lrf", type=float, default=0.01, metavar="F",
                       help="final learning rate as a fraction of --lr (cosine decay)")
    optim.add_argument("--weight-decay", type=float, default=None, metavar="X",
                       help="weight decay, not on BatchNorm and biases (default: adamw 0.05, else 1e-5)")
    optim.add_argument("--warmup-epochs", type=float, default=0.2, metavar="N",
                       help="linear learning-rate warm-up, in epochs")
    optim.add_argument("--label-smoothing", type=float, default=0.1, metavar="X",
                       help="label smoothing of the training loss")
    optim.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                       help="evaluate and save a moving average of the weights (--no-ema: the weights as trained)")
    optim.add_argument("--ema-decay", type=float, default=0.999, metavar="X", help="EMA decay per optimizer step")
    optim.add_argument("--precise-bn", type=int, default=256, metavar="N",
                       help="re-estimate BatchNorm statistics on N training images before each validation; 0: off")
    optim.add_argument("--grad-accum", type=int, default=1, metavar="N",
                       help="accumulate gradients over N batches")
    optim.add_argument("--clip-grad", type=float, default=0.0, metavar="X",
                       help="clip the gradient norm to X; 0: off")
    optim.add_argument("--patience", type=int, default=0, metavar="N",
                       help="early stopping: end the run after N epochs without a better best.pth; 0: off")

    augment = p.add_argument_group("augmentation")
    augment.add_argument("--crop-scale", type=float, nargs=2, default=(0.25, 1.0), metavar=("MIN", "MAX"),
                         help="area range of RandomResizedCrop")
    augment.add_argument("--no-hflip", action="store_true",
                         help="no random horizontal flips (for data where mirroring changes the class: digits, text)")
    augment.add_argument("--auto-augment", default=None, choices=transforms.AUTO_AUGMENT,
                         help="augmentation policy: ta_wide (TrivialAugmentWide), ra (RandAugment), augmix (AugMix) "
                              "or imagenet (AutoAugment's ImageNet policy) (default: none)")
    augment.add_argument("--ra-magnitude", type=int, default=9, metavar="N",
                         help="strength of --auto-augment ra, 0 to 30")
    augment.add_argument("--random-erase", type=float, default=0.0, metavar="P",
                         help="erase a random rectangle of each training image with probability P")
    augment.add_argument("--mixup-alpha", type=float, default=0.0, metavar="A",
                         help="MixUp: blend pairs of images and their labels, the blend drawn from Beta(A, A)")
    augment.add_argument("--cutmix-alpha", type=float, default=0.0, metavar="A",
                         help="CutMix: paste a box of one image into another, labels mixed by area; with "
                              "--mixup-alpha too, each batch gets one of the two")

    hardware = p.add_argument_group("hardware and speed")
    hardware.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or cuda:1")
    hardware.add_argument("--workers", type=int, default=runtime.default_workers(), metavar="N",
                          help="data loading processes")
    hardware.add_argument("--amp", nargs="?", const="bf16", default="auto", choices=["auto", "bf16", "fp16", "off"],
                          help="mixed precision (fp16 with a grad scaler); auto: bf16 on GPUs that have it (A100, "
                               "RTX 30xx and later), fp16 on older GPUs, off on CPUs (bf16 is slower there)")
    hardware.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                          help="channels-last memory format (faster convolutions on CPU and tensor cores)")
    hardware.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on long runs)")
    hardware.add_argument("--grad-checkpointing", action="store_true",
                          help="recompute activations in backward: a quarter of the memory, about 20%% slower")
    hardware.add_argument("--lean-activations", action=argparse.BooleanOptionalAction, default=True,
                          help="keep less for backward: 0.62x the activation memory, the same gradients")
    hardware.add_argument("--sync-bn", action="store_true",
                          help="synchronise BatchNorm statistics across torchrun's GPUs (then --lean-activations "
                               "saves nothing on them)")

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default=None, metavar="DIR",
                     help="run folder (default: weights/<model>-<dataset>, never reused)")
    run.add_argument("--exist-ok", action="store_true", help="allow --output-dir to be a folder that holds a run")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="FILE",
                     help="continue from FILE (a last.pth), or from --output-dir's last.pth")
    run.add_argument("--eval-only", action="store_true",
                     help="only evaluate --weights (or --resume) on the validation images of the data it was trained "
                          "on; writes predictions.csv and mistakes.png to --output-dir (default: a new eval/ beside "
                          "the weights)")
    run.add_argument("--tta", action="store_true",
                     help="with --eval-only: average each image's probabilities with its mirror image's")
    run.add_argument("--log-interval", type=float, default=30, metavar="S",
                     help="seconds between progress lines when the output is not a terminal (a log file, nohup)")
    run.add_argument("--tensorboard", action="store_true",
                     help=f"also write each epoch's figures for TensorBoard into the run folder (needs: "
                          f"{reports.TENSORBOARD_INSTALL})")
    return p


def check_args(p, args):
    """Refuse nonsense before anything is loaded."""
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum}
    for flag, value in positive.items():
        if value < 1:
            p.error(f"{flag} must be at least 1 (got {value})")
    if args.img_size is not None and not 32 <= args.img_size <= 1024:
        # the ceiling is export.py's and the sidecar's; far above it a single image fills the memory
        p.error(f"--img-size must be at least 32 and at most 1024 pixels (got {args.img_size})")
    if not 0 < args.val_rate < 1:
        p.error(f"--val-rate must be between 0 and 1 (got {args.val_rate})")
    if args.workers < 0:
        p.error(f"--workers must be 0 or more (got {args.workers})")
    lo, hi = args.crop_scale
    if not 0 < lo <= hi <= 1:
        p.error(f"--crop-scale needs 0 < MIN <= MAX <= 1 (got {lo} {hi})")
    for flag in ("lr", "lrf", "weight_decay", "warmup_epochs", "label_smoothing", "clip_grad", "mixup_alpha",
                 "cutmix_alpha"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or not math.isfinite(value)):
            p.error(f"--{flag.replace('_', '-')} must be a finite number >= 0 (got {value})")
    if args.lr is not None and args.lr == 0:
        p.error("--lr must be more than 0 (got 0): nothing would be learned")
    if args.lrf > 1:
        p.error(f"--lrf is the final learning rate as a fraction of --lr: between 0 and 1 (got {args.lrf})")
    if args.label_smoothing >= 1:
        p.error(f"--label-smoothing must be below 1 (got {args.label_smoothing}); 0.1 is usual")
    for flag, top in (("dropout", 0.99), ("drop_path", 0.99), ("random_erase", 1)):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= top:
            p.error(f"--{flag.replace('_', '-')} is a probability, from 0 to {top} (got {value})")
    if not 0 <= args.ra_magnitude <= 30:
        p.error(f"--ra-magnitude must be between 0 and 30 (got {args.ra_magnitude}); 9 is usual")
    if args.ra_magnitude != 9 and args.auto_augment != "ra":
        p.error("--ra-magnitude is the strength of RandAugment: use it with --auto-augment ra")
    if args.patience < 0:
        p.error(f"--patience is a number of epochs, 0 (off) or more (got {args.patience})")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        p.exit(2, f"error: --tensorboard needs the tensorboard package: {reports.TENSORBOARD_INSTALL}\n")
    if not 0 <= args.precise_bn:
        p.error(f"--precise-bn is a number of images, 0 or more (got {args.precise_bn})")
    if not 0 < args.ema_decay < 1:
        p.error(f"--ema-decay must be between 0 and 1 (got {args.ema_decay})")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed must be between 0 and 2**32 - 1 (got {args.seed})")
    if args.tta and not args.eval_only:
        p.error("--tta is for --eval-only (and predict.py): training always validates on the plain images")
    if args.eval_only and args.weights is None and args.resume is None:
        p.error("--eval-only needs the weights to evaluate: --weights FILE (e.g. a best.pth) or --resume FILE")
    if args.batch_size == 1 and args.img_size == 32:
        # at 32 px the last feature maps are 1x1: one image gives BatchNorm one value per channel
        p.error("--batch-size 1 cannot train at --img-size 32 (BatchNorm needs more than one value per "
                "channel): use --batch-size 2 or more, or --img-size 33 or more")


def make_run_dir(args):
    """Create the run folder, atomically: two runs started at once never share one. The default is
    weights/<model>-<dataset>, then -2, -3, ...; an earlier run is never overwritten. Returns True
    when this call created the folder."""
    if args.output_dir is None:
        base = os.path.join("weights", f"{args.model}-{os.path.basename(os.path.normpath(args.data_path))}")
        os.makedirs("weights", exist_ok=True)
        args.output_dir = outputs.new_folder(base)
        return True
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_dir)), exist_ok=True)
        os.mkdir(args.output_dir)
        return True
    except FileExistsError:
        if not os.path.isdir(args.output_dir):
            raise  # a file in the way, here or above: start_outputs says it cannot write there
        if args.exist_ok or not os.listdir(args.output_dir):
            return False
        raise errors.UsageError(f"--output-dir {args.output_dir} already holds files: pass --resume to continue "
                                  "that run, --exist-ok to write into it anyway, or choose another folder") from None


def resume_args(args, parser):
    """The flags and checkpoint of the run that --resume continues: its own flags, except those in
    RESUMABLE given now; flags added to train.py since that run take their defaults."""
    path = args.resume or os.path.join(args.output_dir or "", "last.pth")
    ckpt = checkpoint.load_resume(path)
    given = {k: v for k, v in vars(args).items() if k in RESUMABLE and v != parser.get_default(k)}
    defaults = {**vars(parser.parse_args([])), **BEFORE_FLAG}
    restored = argparse.Namespace(**{**defaults, **ckpt["meta"]["args"], **given})
    restored.output_dir = os.path.dirname(path) or "."  # as the user wrote it: messages show the same path
    restored.resume, restored.eval_only = path, args.eval_only
    if args.eval_only:  # evaluating the run, not continuing it: where to write and how are this command's
        restored.output_dir = args.output_dir if args.resume else None
        if "data_path" not in given:
            restored.data_path = trained_data_path(restored.data_path, path)
        restored.tta, restored.exist_ok = args.tta, args.exist_ok
    changed = [f"--{k.replace('_', '-')} {v} (was {ckpt['meta']['args'].get(k)})" for k, v in given.items()
               if k in ("lr", "clip_grad", "amp") and v != ckpt["meta"]["args"].get(k)]
    if changed:
        runtime.print0(f"resuming with {', '.join(changed)}")
    return restored, ckpt


Data = namedtuple("Data", "split train_loader val_loader train_sampler bn_loader check")


def build_data(args, device, stored=None):
    """The split of --data-path and its loaders; under torchrun each process gets its own part.
    The folder is read once, by rank 0; the headers of a large one are checked in the background.
    `stored`: the split a resumed run started with (checkpoint.pack_split), kept whatever the
    folder holds now."""
    rank, world = runtime.rank(), runtime.world_size()
    variant = VARIANTS[args.model]

    kept = None if stored is None else checkpoint.unpack_split(stored, args.data_path, args.resume)

    def read():
        now = utils.read_split_data(args.data_path, args.val_rate, args.seed)
        # a new run, or one saved before last.pth kept its split, splits the folder as it is now
        return now if kept is None else utils.reuse_split(now, args.data_path, *kept)
    split = runtime.on_rank0(read)
    check = utils.BackgroundCheck(split.unchecked) if split.unchecked and rank == 0 else None
    warned = my_dataset.warned_flags()  # an unreadable file is named once, whichever loader meets it
    train_set = my_dataset.MyDataSet(split.train_images, split.train_labels, warned=warned,
                          draft_size=transforms.train_draft_size(args.img_size, args.crop_scale[0]),
                          transform=transforms.build_transform(
                              variant, args.img_size, train=True, scale=tuple(args.crop_scale),
                              hflip=not args.no_hflip, auto_augment=args.auto_augment,
                              ra_magnitude=args.ra_magnitude, random_erase=args.random_erase))
    # validation decodes and resizes as predict.py does, so both see the same pixels
    val_set = my_dataset.MyDataSet(split.val_images, split.val_labels, warned=warned,
                        draft_size=transforms.eval_draft_size(variant.eval_sizes(args.img_size)[0]),
                        transform=transforms.build_transform(variant, args.img_size, train=False))
    # every validation image is evaluated exactly once across ranks: no padding, no duplicates
    val_part = my_dataset.IndexedSubset(val_set, range(rank, len(val_set), world))  # indices: for predictions.csv
    weights = my_dataset.balanced_weights(split.train_labels) if args.balance else None
    train_sampler = my_dataset.EpochSampler(train_set, world, rank, shuffle=True, seed=args.seed, weights=weights)
    if world > 1 and not args.eval_only and len(train_sampler) < args.batch_size:
        # each process would drop its one incomplete batch (make_loader's drop_last): nothing would train
        raise errors.DataError(f"{len(split.train_images)} training images shared by {world} processes leave "
                               f"{len(train_sampler)} to each, fewer than --batch-size {args.batch_size}: use "
                               f"--batch-size {len(train_sampler)} or fewer processes")
    workers = runtime.usable_workers(args.workers)
    bn_loader = None
    if args.precise_bn:  # a fixed sample of training images, decoded and resized as validation does
        sample = torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(args.seed))
        share = max(min(args.precise_bn, len(sample)) // world, 1)  # the same number of batches on every rank
        sample = sample[rank * share:(rank + 1) * share].tolist()
        bn_set = my_dataset.MyDataSet([split.train_images[i] for i in sample], [split.train_labels[i] for i in sample],
                           val_set.transform, val_set.draft_size, warned)
        bn_loader = my_dataset.make_loader(bn_set, args.batch_size, False, workers, device)
    return Data(split, my_dataset.make_loader(train_set, args.batch_size, True, workers, device, train_sampler),
                my_dataset.make_loader(val_part, args.batch_size, False, workers, device), train_sampler, bn_loader,
                check)


# train: what the loop calls (DDP and/or compiled); raw: the plain model, saved in last.pth;
# eval: what is evaluated, and its plain module is saved in best.pth (the EMA's when there is one)
Models = namedtuple("Models", "train raw eval ema")


def build_model(args, num_classes, ckpt, device):
    weights = ckpt if ckpt is not None else pretrained.resolve(args.weights, args.model, runtime.on_rank0)
    model = create_model(args.model, num_classes, weights=weights, verbose=runtime.rank() == 0,
                         grad_checkpointing=args.grad_checkpointing, lean=args.lean_activations,
                         dropout=args.dropout, drop_path_rate=args.drop_path)
    if args.freeze_layers:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(("features.top.", "classifier."))
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if runtime.world_size() > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    compiled = torch.compile(model) if args.compile else model
    train_model = compiled if runtime.world_size() == 1 else torch.nn.parallel.DistributedDataParallel(
        compiled, device_ids=[device.index] if device.type == "cuda" else None)
    ema = recipe.EMA(model, args.ema_decay) if args.ema else None
    return Models(train_model, model, ema.module if ema is not None else compiled, ema)


def set_defaults(args):
    v = VARIANTS[args.model]
    args.img_size = args.img_size or v.train_size
    if args.lr is None:
        base = {"adamw": 1e-3, "sgd": 0.02, "rmsprop": 1e-3}[args.optimizer]
        args.lr = base / (4 if args.weights else 1)  # pretrained weights want gentler steps
    if args.weight_decay is None:
        args.weight_decay = 0.05 if args.optimizer == "adamw" else 1e-5


def build_optimization(args, models, batches_per_epoch, device, ckpt):
    """(optimizer, LR schedule, grad scaler) and the run's progress: new, or as --resume left them."""
    optimizer = recipe.build_optimizer(args, models.raw)
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_lambda(args, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype(args.amp, device) == torch.float16)
    progress = checkpoint.new_progress()
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if args.lr != ckpt["meta"]["args"]["lr"]:  # --lr given with --resume: the schedule goes on from it
            scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
            for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
                group["initial_lr"], group["lr"] = args.lr, args.lr * factor(scheduler.last_epoch)
        if scaler.is_enabled() and ckpt["scaler"]:  # the run may have used another --amp
            scaler.load_state_dict(ckpt["scaler"])
        if models.ema is not None and ckpt.get("ema"):
            models.ema.load_state_dict(ckpt["ema"])
        rngs = ckpt["rng"]
        runtime.set_rng_state(rngs[min(runtime.rank(), len(rngs) - 1)], device)
        progress = {k: ckpt.get(k, v) for k, v in progress.items()}  # keys added since: their start value
        so_far = (f"best val top-1 so far {progress['best_top1']:.4f}" if progress["epoch"]
                  else "no epoch had finished")
        runtime.print0(f"resuming {args.output_dir} at epoch {progress['epoch'] + 1} ({so_far})")
    return (optimizer, scheduler, scaler), progress


def evaluate_only(args, models, data, device, trained):
    """--eval-only: the metrics, each class's figures, and predictions.csv and mistakes.png in
    --output-dir (default: a new folder eval, eval-2, ... beside the weights evaluated). `trained`:
    the META of --weights (trained_as), {} for --resume, whose flags are in `args` already."""
    classes, weights = data.split.classes, args.weights or args.resume
    folder = runtime.on_rank0(lambda: eval_folder(args, weights))  # before the work: a refusal comes first
    tta = args.tta and not trained_without_flips(args, trained)

    def unmake():  # the folder made for this evaluation, still empty: nothing is left behind
        if folder and args.output_dir is None and runtime.rank() == 0:
            try:
                os.rmdir(folder)
            except OSError:
                pass
    try:
        result = utils.evaluate(models.eval, data.val_loader, device, len(classes), args.channels_last,
                                runtime.rank() == 0, tta=tta)
    except BaseException:
        unmake()
        raise
    read, total = int(result["confusion"].sum()), len(data.split.val_images)
    if not read:
        unmake()
        runtime.print0(f"error: none of the {total} validation images could be read (named above); nothing to "
                       "evaluate", file=sys.stderr)
        return 1
    runtime.print0(f"{read if read == total else f'{read} of {total} (the others unreadable)'} validation images"
                   f"{' (--tta: with their mirror images)' if tta else ''}: "
                   f"loss {result['val_loss']:.4f}  top-1 {result['val_top1']:.4f}  top-5 {result['val_top5']:.4f}")
    for row in reports.per_class_rows(result["confusion"], classes):
        runtime.print0(f"  {cli.printable(row['class']):>20}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
                     f"f1 {row['f1']:.3f}  support {row['support']}")
    if runtime.rank() == 0 and folder:
        try:
            written = reports.write_mistakes(folder, result["predictions"], data.split,
                                             f"validation, {os.path.basename(weights)}")
            runtime.print0(f"{cli.printable(folder)}: {written}")
        except OSError as e:
            runtime.print0(f"warning: cannot write predictions.csv and mistakes.png to {folder} ({e.strerror}); "
                         "name a writable folder with --output-dir", file=sys.stderr)
    return 0


def eval_folder(args, weights):
    """Where --eval-only writes, checked and made: --output-dir, or else a new folder eval (then
    eval-2, ...) in the weights' folder, so that the run's own predictions.csv and mistakes.png stay
    as training wrote them. The folder is locked first, as training locks a run's; files there from
    before are replaced only with --exist-ok. None (with a warning) where nothing can be written."""
    try:
        if args.output_dir is None:
            base = os.path.join(os.path.dirname(weights) or ".", "eval")
            return outputs.new_folder(base)
        folder = args.output_dir
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        runtime.print0(f"warning: cannot write predictions.csv and mistakes.png to {e.filename or folder} "
                       f"({e.strerror}); name a writable folder with --output-dir", file=sys.stderr)
        return None
    outputs.lock_folder(folder)  # a run folder: not while train.py writes to it
    there = [name for name in ("predictions.csv", "mistakes.png") if os.path.exists(os.path.join(folder, name))]
    if there and not args.exist_ok:
        raise errors.UsageError(f"--output-dir {folder} already holds {' and '.join(there)}: choose another folder "
                                "(without --output-dir: a new one beside the weights), or pass --exist-ok to replace them")
    return folder


def trained_as(args, parser):
    """--eval-only --weights FILE, FILE a checkpoint of this repo: its META (else {}), and from it
    what evaluating it needs unless given now: its image size, and the --seed and --val-rate of
    its split, so that its validation images are the ones evaluated."""
    if not os.path.isfile(args.weights):
        return {}
    meta = checkpoint.read_meta(checkpoint.load_checkpoint(args.weights), args.weights)
    if not meta:
        return {}
    trained = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    fields = {"img_size": (meta.get("img_size"), lambda v: type(v) is int and 32 <= v <= 1024),
              "classes": (meta.get("classes"), lambda v: isinstance(v, list) and len(v) >= 2
                          and all(isinstance(c, str) for c in v)),
              "seed": (trained.get("seed", args.seed), lambda v: type(v) is int and 0 <= v < 2**32),
              "val_rate": (trained.get("val_rate", args.val_rate), lambda v: type(v) is float and 0 < v < 1)}
    for name, (value, valid) in fields.items():
        if not valid(value):
            raise WeightsError(f"{args.weights}: its metadata field {name} is not usable ({str(value)[:60]}); "
                               "it is not a checkpoint as train.py writes them")
    if args.img_size is None:
        args.img_size = meta["img_size"]
    elif args.img_size != meta["img_size"]:
        runtime.print0(f"note: evaluating at --img-size {args.img_size}; {args.weights} was trained at "
                       f"{meta['img_size']} px", file=sys.stderr)
    for flag in ("seed", "val_rate"):
        if getattr(args, flag) == parser.get_default(flag):
            setattr(args, flag, fields[flag][0])
    if args.data_path == parser.get_default("data_path") and trained.get("data_path", args.data_path) != args.data_path:
        args.data_path = trained_data_path(trained["data_path"], args.weights)
    return meta


def trained_data_path(folder, weights):
    """The data folder `weights` was trained on, for --eval-only without --data-path: said, or
    refused in one line when it is not on this machine."""
    if not isinstance(folder, str) or "\0" in folder or not os.path.isdir(folder):
        raise errors.UsageError(f"--eval-only: {weights} was trained on {cli.printable(str(folder)[:200])}, which is "
                                "not a folder here; pass --data-path with the class folders to evaluate on")
    runtime.print0(f"evaluating on {cli.printable(folder)}, the data {weights} was trained on (--data-path to "
                   "choose other data)")
    return folder


def trained_without_flips(args, meta):
    """True (with a note) when --tta would show the model mirror images it was trained never to see."""
    no_hflip = args.no_hflip or (meta.get("args") or {}).get("no_hflip", False)
    if no_hflip:
        runtime.print0("note: --tta left off: the model was trained with --no-hflip, so its mirror images may be "
                     "other classes", file=sys.stderr)
    return no_hflip


def start_outputs(args, ckpt, split, save_first):
    """The run folder, locked for this process: a new one, or the resumed run's (cleaned of writes a
    kill cut short), with what is known before training. A new folder gets its first last.pth
    (epoch 0) at once, so that a run stopped in its first epoch can be resumed; stopped before
    that, the folder is removed again."""
    made = False
    try:
        if ckpt is None:
            made = make_run_dir(args)
        outputs.lock_folder(args.output_dir)
        outputs.remove_stale_temp_files(args.output_dir)
        model_files.write_class_indices(os.path.join(args.output_dir, "class_indices.json"), split.classes)
        if len(split.broken) > utils.NAMED_ONE_BY_ONE:  # the summary printed points here
            utils.write_left_out(os.path.join(args.output_dir, utils.LEFT_OUT_LIST), split.broken)
        if ckpt is None:
            save_first()
    except BaseException as e:
        if made and not os.path.exists(os.path.join(args.output_dir, "last.pth")):
            shutil.rmtree(args.output_dir, ignore_errors=True)
        if isinstance(e, OSError):  # not a folder, read-only, a full disk
            raise errors.UsageError(f"cannot write to the run folder {args.output_dir} ({e.strerror}): choose "
                                      "another with --output-dir or free some space") from None
        raise


def main(args, parser):
    runtime.check_torchvision()  # augmentation needs it: a mismatched install fails here, before any folder is made
    ckpt = None
    if args.resume is not None:
        args, ckpt = resume_args(args, parser)
    trained = trained_as(args, parser) if args.eval_only and ckpt is None else {}
    set_defaults(args)
    # the device first (--device may come from the resumed run): it decides torchrun's backend
    device = runtime.choose_device(args.device, *runtime.torchrun_local())
    rank, world, _ = runtime.setup_distributed(device)
    if ckpt is not None and not args.eval_only and (line := nothing_left(args, ckpt)):
        runtime.print0(line)
        return 0
    if device.type == "cpu":
        runtime.keep_freed_memory()
    runtime.configure_cuda(device, train=not args.eval_only)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)

    data = build_data(args, device, ckpt and ckpt.get("split"))
    classes = data.split.classes
    if ckpt is not None and ckpt["meta"]["classes"] != classes:
        raise errors.DataError(f"--resume: {args.data_path} has classes {classes}, but the run was trained on "
                                 f"{ckpt['meta']['classes']}; resume with the same data or start a new run")
    if trained.get("classes", classes) != classes:  # a fresh classifier would be scored: chance, not the model
        raise errors.DataError(f"--eval-only: {args.data_path} has classes {classes}, but {args.weights} was trained "
                               f"on {trained['classes']}; evaluate it on data with the same class folders")
    models = build_model(args, len(classes), ckpt, device)
    if args.eval_only:
        if ckpt is not None and models.ema is not None and ckpt.get("ema"):
            models.ema.load_state_dict(ckpt["ema"])  # what the run evaluated, and saved as best.pth
        return evaluate_only(args, models, data, device, trained)
    optimization, progress = build_optimization(args, models, len(data.train_loader), device, ckpt)
    progress["split"] = checkpoint.pack_split(args.data_path, data.split.train_images, data.split.train_labels,
                                              data.split.val_images, data.split.val_labels)
    meta = checkpoint.make_meta(args, classes, VARIANTS[args.model], models.raw.bn_eps)
    save = lambda: save_last(args, models, meta, progress, optimization)  # noqa: E731
    if rank == 0:
        start_outputs(args, ckpt, data.split, save)
    elif ckpt is None:
        save()  # its part of the first last.pth: this process's RNG state
    amp = runtime.amp_dtype(args.amp, device)
    runtime.print0(f"EfficientNet-{args.model.upper()} at {args.img_size}px, {len(classes)} classes, "
                 f"{len(data.split.train_images)} train / {len(data.split.val_images)} val images, device {device}"
                 f"{f' x {world} processes' if world > 1 else ''}, global batch {args.batch_size * world * args.grad_accum}, "
                 f"{args.optimizer} lr {args.lr:g}, amp {amp and str(amp).split('.')[-1] or 'off'}")
    runtime.print0(f"writing to {args.output_dir}")
    return fit(args, models, data, optimization, progress, meta, device)


def save_last(args, models, meta, progress, optimization):
    """last.pth with every process's RNG state, so that each resumes its own streams."""
    device = next(models.raw.parameters()).device
    rngs = runtime.gather_objects(runtime.rng_state(device))
    if runtime.rank() == 0:
        checkpoint.save_last(os.path.join(args.output_dir, "last.pth"), models.raw, meta, progress, *optimization,
                             models.ema, rngs)


def fit(args, models, data, optimization, progress, meta, device):
    """The epoch loop: train, validate, keep the best epoch, save the run's files; the exit code."""
    optimizer = optimization[0]
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    is_main, classes = runtime.rank() == 0, data.split.classes
    done = progress["epoch"]  # the last epoch whose state last.pth holds
    stuck = 0  # epochs in a row whose validation says nothing has been learned
    mix = transforms.build_mix(args.mixup_alpha, args.cutmix_alpha, len(classes))
    counts = torch.bincount(torch.as_tensor(data.split.train_labels), minlength=len(classes))
    imbalanced = bool(counts.max() >= 2 * counts.min())  # then each epoch shows every class's recall
    board = reports.TensorBoardLog(args.output_dir, done + 1) if args.tensorboard and is_main else None
    try:
        for epoch in range(done + 1, args.epochs + 1):
            data.train_sampler.set_epoch(epoch)
            start = time.perf_counter()
            trained = utils.train_one_epoch(models.train, criterion, optimizer, data.train_loader, device, epoch,
                                            args, *optimization[1:], models.ema, is_main, mix)
            result = validate(args, models, data, device, epoch)
            read = int(result["confusion"].sum())  # the validation images that could be read
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": trained.loss,
                   **{k: result[k] if read else math.nan for k in ("val_loss", "val_top1", "val_top5")},
                   "epoch_seconds": time.perf_counter() - start, "images_per_second": trained.images_per_second,
                   "data_wait": trained.data_wait}
            progress["history"].append(row)
            if read and better_than_best(result, progress):
                keep_best(args, models, meta, progress, epoch, result)
            progress["epoch"] = epoch
            if board is not None:  # before last.pth: a resumed run hides what was logged after it
                board.epoch(row)
            save_last(args, models, meta, progress, optimization)
            done = epoch
            if is_main:
                write_plots(args, progress, data.split)
            if not read:  # this epoch's training is kept; what is there to validate on must be fixed first
                return failed(args, done, f"no validation image could be read in epoch {epoch} (named above)",
                              f"check the files under {args.data_path}, then resume with: {resume_command(args)}")
            problem = reports.learning_problem(result["confusion"], classes)
            stuck = stuck + 1 if problem else 0
            report_epoch(args, row, result, progress["history"], data, problem if stuck >= 2 else None, imbalanced)
            if args.patience and epoch - (progress["best_epoch"] or 0) >= args.patience and epoch < args.epochs:
                runtime.print0(stopped_early(args, progress))
                break
        if data.check is not None:
            data.check.report(wait=True)
        finish(args, progress, data.split)
    except KeyboardInterrupt:
        return interrupted(args, done)
    except errors.NonFiniteLossError as e:
        return failed(args, done, f"{e}; stopped", "resume with a lower --lr, --clip-grad 1 or --amp off (all "
                      f"taken on --resume): {resume_command(args)} --lr ...")
    except OSError as e:  # a full disk, a folder that went away: the files written before are whole
        return failed(args, done, f"cannot write {e.filename or 'to ' + args.output_dir} ({e.strerror})",
                      f"free some space, then resume with: {resume_command(args)}")
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):
            raise
        # "DataLoader worker (pid 123) is killed by signal: Killed.": the out-of-memory killer, most often
        return failed(args, done, f"a data loader worker died in epoch {done + 1} (\"{str(e).splitlines()[0]}\"); "
                      "out of memory?", f"resume with fewer --workers: {resume_command(args)} --workers "
                      f"{args.workers // 2}")
    finally:
        if board is not None:
            board.close()
    return 0


def validate(args, models, data, device, epoch):
    """utils.evaluate's figures for the weights to be saved, after their BatchNorm statistics were
    made to fit them; NonFiniteLossError when the weights or the validation loss are not finite."""
    if data.bn_loader is not None:  # statistics that describe the weights being evaluated
        plain = models.raw if models.ema is None else models.ema.module
        utils.precise_bn(plain, data.bn_loader, device, args.channels_last, runtime.rank() == 0)
    else:  # BatchNorm statistics drift apart on each rank: evaluate (and save) rank 0's everywhere
        runtime.broadcast_buffers(models.eval)
    utils.check_finite(models.raw, epoch)
    result = utils.evaluate(models.eval, data.val_loader, device, len(data.split.classes), args.channels_last,
                            runtime.rank() == 0)
    if result["confusion"].sum() and not math.isfinite(result["val_loss"]):
        raise errors.NonFiniteLossError(f"the validation loss became {result['val_loss']} in epoch {epoch}")
    return result


def best_row(progress):
    """The history row of the epoch best.pth holds, or None (no epoch yet, or a run saved before
    last.pth kept the best epoch's number)."""
    return next((r for r in progress["history"] if r["epoch"] == progress["best_epoch"]), None)


def better_than_best(result, progress):
    """Whether this epoch replaces best.pth: a higher val top-1, or the same top-1 with a lower val
    loss. A small validation set's top-1 moves in coarse steps and can stay the same for many
    epochs while the model goes on improving; the loss tells those epochs apart. Under torchrun
    every rank holds the same all-reduced figures, so all of them decide alike."""
    if result["val_top1"] < progress["best_top1"]:
        return False
    best = best_row(progress)
    if result["val_top1"] == progress["best_top1"] and not (best and result["val_loss"] < best["val_loss"]):
        return False
    if not read_as_many(result, progress):
        runtime.print0(f"  note: top-1 {result['val_top1']:.4f} is over the {int(result['confusion'].sum())} "
                       f"validation images that could be read; best.pth (epoch {progress['best_epoch']}) was "
                       "scored on more of them, so it stays", file=sys.stderr)
        return False
    return True


def keep_best(args, models, meta, progress, epoch, result):
    progress.update(best_top1=result["val_top1"], best_epoch=epoch, best_confusion=result["confusion"],
                    best_predictions=result["predictions"])
    if runtime.rank() == 0:
        plain = models.raw if models.ema is None else models.ema.module
        checkpoint.save_best(os.path.join(args.output_dir, "best.pth"), plain, meta, epoch, result["val_top1"])


def write_plots(args, progress, split):
    """metrics.csv and the pictures that change each epoch."""
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    reports.write_metrics(out("metrics.csv"), progress["history"])
    reports.plot_curves(progress["history"], out("curves.png"), len(split.classes), progress["best_epoch"])
    if not os.path.exists(out("class_distribution.png")):  # drawn here, not before the first step
        reports.plot_class_distribution(split, out("class_distribution.png"))


def report_epoch(args, row, result, history, data, problem, imbalanced):
    """The epoch's line, and what validation says beside it: `problem` (no learning for a while),
    unreadable images, each class's recall where some classes have far more training images."""
    classes = data.split.classes
    runtime.print0(epoch_line(args, row, history, len(classes), problem))
    read, total = int(result["confusion"].sum()), len(data.split.val_images)
    if read < total:
        runtime.print0(f"  {total - read} of {total} validation images could not be read (named above); top-1 "
                       "is over the others")
    if imbalanced:
        runtime.print0("  " + reports.recall_line(result["confusion"], classes))
    if data.check is not None:  # a large folder's headers, read while this epoch ran
        data.check.report()


def stopped_early(args, progress):
    epoch, best = progress["epoch"], progress["best_epoch"]
    return (f"stopping early after epoch {epoch} of {args.epochs}: no better best.pth for {args.patience} epochs "
            f"(--patience {args.patience}; best.pth holds epoch {best}). To train on: {resume_command(args)} "
            f"--patience {2 * args.patience}")


def read_as_many(result, progress):
    """Whether this epoch's validation read every image that the best epoch's did. Files gone or
    broken since would leave an easier, smaller set: its top-1 cannot be weighed against best.pth's."""
    best = progress["best_predictions"]
    if best is None or "predictions" not in result:  # no best yet, or one saved before predictions were kept
        return progress["best_confusion"] is None or result["confusion"].sum() >= progress["best_confusion"].sum()
    return set(best["index"].tolist()) <= set(result["predictions"]["index"].tolist())


def epoch_line(args, row, history, num_classes, problem):
    """The line each epoch prints: losses, accuracy (top-5 only where it can be wrong), time, the
    time left for the whole run, and a note when validation has shown no learning for a while."""
    this_session = [r["epoch_seconds"] for r in history][-(row["epoch"] - history[0]["epoch"] + 1):]
    left = (args.epochs - row["epoch"]) * sum(this_session) / len(this_session)
    top5 = f"top-5 {row['val_top5']:.4f}  " if num_classes > 5 else ""
    line = (f"epoch {row['epoch']}/{args.epochs}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
            f"top-1 {row['val_top1']:.4f}  {top5}lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s  "
            f"{row['images_per_second']:.1f} img/s" + (f"  run ends in {utils.duration(left)}" if left else ""))
    return line + (f"\n  not learning yet: {problem}" if problem else "")


def finish(args, progress, split):
    """The best epoch's confusion matrix, per-class figures and mistakes, and the last word of the run."""
    classes = split.classes
    best, confusion = progress["best_top1"], progress["best_confusion"]
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    if runtime.rank() == 0 and confusion is not None:
        best_epoch = progress["best_epoch"] or next(r["epoch"] for r in progress["history"] if r["val_top1"] == best)
        reports.plot_confusion(confusion, classes, out("confusion_matrix.png"),
                             f"validation, epoch {best_epoch} (best.pth): top-1 {best:.4f}")
        reports.write_per_class(out("per_class.csv"), confusion, classes)
        predictions = progress["best_predictions"]
        if predictions is not None and predictions["index"].ge(len(split.val_images)).any():
            # resumed from a last.pth saved before it kept the split, and the folder has changed since
            runtime.print0("note: predictions.csv and mistakes.png not written: the validation files have changed "
                           "since the best epoch", file=sys.stderr)
        elif predictions is not None:
            runtime.print0(reports.write_mistakes(args.output_dir, progress["best_predictions"], split,
                                              f"validation, epoch {best_epoch} (best.pth)"))
    runtime.print0(f"done: best val top-1 {best:.4f}; {out('best.pth')}{best_reason(progress)}")
    runtime.print0(f"predict with: python predict.py IMAGES --weights {shlex.quote(out('best.pth'))}")
    problem = confusion is not None and reports.learning_problem(confusion, classes)
    if problem:
        runtime.print0(f"warning: the model has not learned to tell the classes apart: {problem}. Try more "
                     f"--epochs, pretrained --weights (see README), or a lower --lr (this run: {args.lr:g})",
                     file=sys.stderr)


def best_reason(progress):
    """Which epoch best.pth holds and why, as the end of the run's last line."""
    best = best_row(progress)
    if best is None:
        return ""
    ties = [r for r in progress["history"] if r["val_top1"] == best["val_top1"]]
    if len(ties) == 1:
        return f" holds epoch {best['epoch']}, the one with that top-1"
    lowest = min(r["val_loss"] for r in ties) == best["val_loss"]
    return (f" holds epoch {best['epoch']}: {len(ties)} epochs reached that top-1, and "
            + ("its val loss was the lowest of them" if lowest else "it was the first")
            + f" ({best['val_loss']:.4f})")


def nothing_left(args, ckpt):
    """For --resume of a run with nothing left to do (all its epochs trained, or stopped by
    --patience): the line that says so and how to go on; None when there is training to do."""
    last, done = args.resume, ckpt["epoch"]
    best = f"best.pth holds epoch {ckpt.get('best_epoch')}" if ckpt.get("best_epoch") else "no best.pth yet"
    if done >= args.epochs:
        return (f"{last} has finished its run: it holds epoch {done} of --epochs {args.epochs} ({best}). To "
                f"train it longer: {resume_command(args)} --epochs M, with M more than {done}")
    since = done - (ckpt.get("best_epoch") or 0)
    if args.patience and since >= args.patience:
        return (f"{last} stopped early at epoch {done} of {args.epochs}: no better best.pth for {since} epochs "
                f"(--patience {args.patience}; {best}). To train on: {resume_command(args)} --patience M, with M "
                f"more than {since} (0: no early stop)")
    return None


def resume_command(args):
    world = runtime.world_size()
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    return f"{launcher} train.py --resume {os.path.join(args.output_dir, 'last.pth')}"


def interrupted(args, done):
    """Tell how to go on after Ctrl-C or SIGTERM in epoch done + 1 (or after the last); exit code 130."""
    last = os.path.join(args.output_dir, "last.pth")
    if done >= args.epochs:  # while the last plots were drawn
        runtime.print0(f"\ninterrupted after the last epoch; {last} holds epoch {done}: the run is complete",
                     file=sys.stderr)
    else:
        holds = f"{last} holds epoch {done}" if done else "no epoch finished yet"
        runtime.print0(f"\ninterrupted in epoch {done + 1}; {holds}. Resume with:\n  {resume_command(args)}",
                     file=sys.stderr)
    return 130


def failed(args, done, error, advice):
    """One line for a run that cannot go on: what failed, what last.pth holds, what to do; exit code 1."""
    last = os.path.join(args.output_dir, "last.pth")
    holds = f"{last} holds epoch {done}" if done else f"no epoch finished yet ({last} holds the start)"
    runtime.print0(f"error: {error}. {holds}; {advice}", file=sys.stderr)
    return 1


def on_signal(signum, frame):
    SIGNALLED.append(signum)
    runtime.stop_watching_workers()
    raise KeyboardInterrupt  # SIGTERM, SIGHUP (a closed terminal) as Ctrl-C: last.pth stays, the resume command shown


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if SIGNALLED:  # a library caught the interrupt while it loaded (numpy's lazy imports do) and went on
        print("\ninterrupted before training started", file=sys.stderr)
        sys.exit(130)
    cli.speak_any_file_name()
    sys.stderr = cli.UnreadStream(sys.stderr)
    sys.stdout = cli.UnreadStream(sys.stdout, sys.stderr)
    cli.quiet_warnings()
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    try:
        code = main(args, parser)
    except (errors.UsageError, WeightsError) as e:
        print(f"error: {cli.printable(str(e))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before the first epoch: nothing to resume yet, and no run folder left
        print("\ninterrupted before training started", file=sys.stderr)
        code = 130
    except Exception:
        if not SIGNALLED:
            raise
        # the interrupt landed inside a library's lazy import or set-up, which turned it into another
        # error (numpy: "module 'numpy' has no attribute 'matrix'"); the user asked to stop, so stop
        print("\ninterrupted before training started", file=sys.stderr)
        code = 130
    finally:
        outputs.release_folders()  # the command is over (a run in this same process may come next)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
