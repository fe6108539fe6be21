"""Train an EfficientNet classifier on a folder of images (one sub-folder per class).

    python train.py --img-size 64 --epochs 6                      # B0 on the bundled digits
    python train.py --data-path data/flower_photos --model b0 --weights imagenet
    python train.py --resume weights/b0-flower_photos/last.pth    # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --data-path data/flower_photos

Each run writes to its own folder (default weights/<model>-<dataset>, then -2, -3, ...): best.pth,
last.pth, metrics.csv, curves.png, confusion_matrix.png, per_class.csv, class_indices.json.
"""
import stop_signals  # first of all: a Ctrl-C while torch loads ends the script quietly

import argparse
import importlib.util
import math
import os
import random
import sys
import time
from collections import namedtuple

import torch
import torch.distributed as dist

import checkpoint
import cli
import errors
import eval_only
import my_dataset
import outputs
import pretrained
import recipe
import reports
import runtime
import transforms
import utils
from model import MAX_IMG_SIZE, MIN_IMG_SIZE, VARIANTS, VARIANTS_HELP, create_model, title
from saver import Saver, nothing_left
from weight_files import load_weights

HERE = os.path.dirname(os.path.abspath(__file__))
# flags a resumed run may change; the others come from the run itself
RESUMABLE = ("epochs", "device", "workers", "data_path", "resume", "lr", "clip_grad", "amp", "patience",
             "tensorboard")
# what runs saved before these flags existed did; other new flags take their defaults on --resume
BEFORE_FLAG = {"drop_path": 0.2, "precise_bn": 0}


def get_args_parser():
    p = cli.ArgumentParser(description="Train EfficientNet B0-B7 or EfficientNetV2 S/M/L on a folder of images.",
                           usage="%(prog)s [--data-path DIR] [--model b0..b7|v2_s..v2_l] [--weights imagenet|FILE] [--epochs N]\n"
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
    model.add_argument("--model", default="b0", choices=list(VARIANTS), help=VARIANTS_HELP)
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
                       help=f"peak learning rate (default: {recipe.LR_HELP}; scale it with the batch)")
    optim.add_argument("--lrf", type=float, default=0.01, metavar="F",
                       help="final learning rate as a fraction of --lr (cosine decay)")
    optim.add_argument("--weight-decay", type=float, default=None, metavar="X",
                       help=f"weight decay, not on BatchNorm and biases (default: {recipe.WEIGHT_DECAY_HELP})")
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
    hardware.add_argument("--workers", type=int, default=None, metavar="N",
                          help="data loading processes (default: on a GPU, the CPUs less one, up to the batch; on "
                               f"a CPU, the CPUs up to 8: {runtime.default_workers()} here)")
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
    if args.img_size is not None and not MIN_IMG_SIZE <= args.img_size <= MAX_IMG_SIZE:
        p.error(f"--img-size must be at least {MIN_IMG_SIZE} and at most {MAX_IMG_SIZE} pixels (got {args.img_size})")
    if not 0 < args.val_rate < 1:
        p.error(f"--val-rate must be between 0 and 1 (got {args.val_rate})")
    if args.workers is not None and args.workers < 0:
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


def resume_args(args, parser):
    """The flags and checkpoint (checkpoint.Resume) of the run that --resume continues: its own
    flags, except those in RESUMABLE given now; flags added to train.py since that run take their
    defaults."""
    path = args.resume or os.path.join(args.output_dir or "", "last.pth")
    resume = checkpoint.load_resume(path)
    given = {k: v for k, v in vars(args).items() if k in RESUMABLE and v != parser.get_default(k)}
    defaults = {**vars(parser.parse_args([])), **BEFORE_FLAG}
    restored = argparse.Namespace(**{**defaults, **resume.args, **given})
    restored.output_dir = os.path.dirname(path) or "."  # as the user wrote it: messages show the same path
    restored.resume, restored.eval_only = path, args.eval_only
    if args.eval_only:  # evaluating the run, not continuing it: where to write and how are this command's
        restored.output_dir = args.output_dir if args.resume else None
        if "data_path" not in given:
            restored.data_path = eval_only.trained_data_path(restored.data_path, path)
        restored.tta, restored.exist_ok = args.tta, args.exist_ok
    changed = [f"--{k.replace('_', '-')} {v} (was {resume.args.get(k)})" for k, v in given.items()
               if k in ("lr", "clip_grad", "amp") and v != resume.args.get(k)]
    if changed:
        runtime.print0(f"resuming with {', '.join(changed)}")
    return restored, resume


# normalize: the end of every pipeline, on the device (the loaders yield uint8 images)
Data = namedtuple("Data", "split train_loader val_loader train_sampler bn_loader check normalize")


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
    augment = transforms.build_transform(variant, args.img_size, train=True, scale=tuple(args.crop_scale),
                                         hflip=not args.no_hflip, auto_augment=args.auto_augment,
                                         ra_magnitude=args.ra_magnitude, random_erase=args.random_erase)
    train_set = my_dataset.MyDataSet(split.train_images, split.train_labels, warned=warned, transform=augment,
                                     draft_size=transforms.train_draft_size(args.img_size, args.crop_scale[0]))
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
        bn_set = my_dataset.MyDataSet([split.train_images[i] for i in sample],
                                      [split.train_labels[i] for i in sample], val_set.transform, val_set.draft_size,
                                      warned)
        bn_loader = my_dataset.make_loader(bn_set, args.batch_size, False, workers, device)
    return Data(split, my_dataset.make_loader(train_set, args.batch_size, True, workers, device, train_sampler),
                my_dataset.make_loader(val_part, args.batch_size, False, workers, device), train_sampler, bn_loader,
                check, val_set.transform.normalize)  # the same mean and std for both pipelines


# train: what the loop calls (DDP and/or compiled); raw: the plain model, saved in last.pth;
# eval: what is evaluated, and its plain module is saved in best.pth (the EMA's when there is one)
Models = namedtuple("Models", "train raw eval ema")


def build_model(args, num_classes, resume, device):
    model = create_model(args.model, num_classes, grad_checkpointing=args.grad_checkpointing,
                         lean=args.lean_activations, dropout=args.dropout, drop_path_rate=args.drop_path)
    weights = resume.weights if resume is not None else pretrained.resolve(args.weights, args.model, runtime.on_rank0)
    if weights is not None:
        load_weights(model, weights, verbose=runtime.rank() == 0)
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
    args.img_size = args.img_size or VARIANTS[args.model].train_size
    if args.lr is None:
        args.lr = recipe.default_lr(args.optimizer, pretrained=bool(args.weights))
    if args.weight_decay is None:
        args.weight_decay = recipe.WEIGHT_DECAY[args.optimizer]


def build_optimization(args, models, batches_per_epoch, device, resume):
    """(optimizer, LR schedule, grad scaler) and the run's progress (checkpoint.Progress): new, or
    as --resume left them."""
    optimizer = recipe.build_optimizer(args, models.raw)
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_lambda(args, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype(args.amp, device) == torch.float16)
    if resume is None:
        return (optimizer, scheduler, scaler), checkpoint.Progress()
    refuse_state(resume, checkpoint.state_problem(resume, optimizer, models.ema))
    optimizer.load_state_dict(resume.optimizer)
    scheduler.load_state_dict(resume.scheduler)
    if args.lr != resume.args["lr"]:  # --lr given with --resume: the schedule goes on from it
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = args.lr, args.lr * factor(scheduler.last_epoch)
    if scaler.is_enabled() and resume.scaler:  # the run may have used another --amp
        scaler.load_state_dict(resume.scaler)
    if models.ema is not None and resume.ema:
        models.ema.load_state_dict(resume.ema)
    runtime.set_rng_state(resume.rng[min(runtime.rank(), len(resume.rng) - 1)], device)
    progress = resume.progress
    so_far = f"best val top-1 so far {progress.best_top1:.4f}" if progress.epoch else "no epoch had finished"
    runtime.print0(f"resuming {args.output_dir} at epoch {progress.epoch + 1} ({so_far})")
    return (optimizer, scheduler, scaler), progress


def refuse_state(resume, problem):
    if problem:
        raise errors.WeightsError(f"--resume: {resume.path}: its {problem[0]} is {problem[1]}; this last.pth was not "
                                  "written by train.py for this run, or it is damaged")


def main(args, parser):
    runtime.check_torchvision()  # augmentation needs it: a mismatched install fails here, before any folder is made
    resume = None
    if args.resume is not None:
        args, resume = resume_args(args, parser)
    trained = eval_only.trained_as(args, parser) if args.eval_only and resume is None else {}
    set_defaults(args)
    # the device first (--device may come from the resumed run): it decides torchrun's backend
    device = runtime.choose_device(args.device, *runtime.torchrun_local())
    rank, world, _ = runtime.setup_distributed(device)
    if args.workers is None:
        args.workers = runtime.default_workers(device, args.batch_size)
    if resume is not None and not args.eval_only and (line := nothing_left(args, resume.progress)):
        runtime.print0(line)
        return 0
    if device.type == "cuda" and args.batch_size == parser.get_default("batch_size") and resume is None \
            and not args.eval_only:
        runtime.print0(f"note: --batch-size {args.batch_size} leaves a GPU waiting on this process most of each "
                       "step; README's \"Batch size on a GPU\" says how to choose a larger one", file=sys.stderr)
    if device.type == "cpu":
        runtime.keep_freed_memory()
    runtime.configure_cuda(device, train=not args.eval_only)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)

    data = build_data(args, device, resume and resume.progress.split)
    classes = data.split.classes
    if resume is not None and resume.classes != classes:
        raise errors.DataError(f"--resume: {args.data_path} has classes {classes}, but the run was trained on "
                               f"{resume.classes}; resume with the same data or start a new run")
    if trained.get("classes", classes) != classes:  # a fresh classifier would be scored: chance, not the model
        raise errors.DataError(f"--eval-only: {args.data_path} has classes {classes}, but {args.weights} was "
                               f"trained on {trained['classes']}; evaluate it on data with the same class folders")
    models = build_model(args, len(classes), resume, device)
    if args.eval_only:
        if resume is not None and models.ema is not None and resume.ema:
            refuse_state(resume, checkpoint.ema_problem(resume, models.ema))
            models.ema.load_state_dict(resume.ema)  # what the run evaluated, and saved as best.pth
        return eval_only.evaluate_only(args, models, data, device, trained)
    optimization, progress = build_optimization(args, models, len(data.train_loader), device, resume)
    progress.split = checkpoint.pack_split(args.data_path, data.split.train_images, data.split.train_labels,
                                           data.split.val_images, data.split.val_labels)
    meta = checkpoint.make_meta(args, classes, VARIANTS[args.model], models.raw.bn_eps)
    run = Saver(args, models, meta, progress, optimization, data.split)
    run.start(new=resume is None)
    amp = runtime.amp_dtype(args.amp, device)
    runtime.print0(f"{title(args.model)} at {args.img_size}px, {len(classes)} classes, "
                   f"{len(data.split.train_images)} train / {len(data.split.val_images)} val images, device {device}"
                   f"{f' x {world} processes' if world > 1 else ''}, global batch "
                   f"{args.batch_size * world * args.grad_accum}, {args.optimizer} lr {args.lr:g}, "
                   f"amp {amp and str(amp).split('.')[-1] or 'off'}")
    runtime.print0(f"writing to {args.output_dir}")
    return fit(args, models, data, optimization, run, device)


def fit(args, models, data, optimization, run, device):
    """The epoch loop: train, validate, and let the Saver keep the run's files; the exit code."""
    optimizer = optimization[0]
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    mix = transforms.build_mix(args.mixup_alpha, args.cutmix_alpha, len(data.split.classes))
    report = EpochReport(args, data, device)
    try:
        for epoch in range(run.progress.epoch + 1, args.epochs + 1):
            data.train_sampler.set_epoch(epoch)
            start = time.perf_counter()
            trained = utils.train_one_epoch(models.train, criterion, optimizer, data.train_loader, device, epoch,
                                            args, *optimization[1:], models.ema, runtime.rank() == 0, mix,
                                            data.normalize)
            result = validate(args, models, data, device, epoch)
            read = int(result["confusion"].sum())  # the validation images that could be read
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": trained.loss,
                   **{k: result[k] if read else math.nan for k in ("val_loss", "val_top1", "val_top5")},
                   "epoch_seconds": time.perf_counter() - start, "data_time": trained.data_time,
                   "images_per_second": trained.images_per_second, "data_wait": trained.data_wait}
            run.epoch_end(row, result)
            if not read:  # this epoch's training is kept; what is there to validate on must be fixed first
                return run.unreadable_validation()
            report.epoch(row, result, run.progress.history)
            if run.patience_ran_out():
                break
        if data.check is not None:
            data.check.report(wait=True)
        run.finish()
    except (KeyboardInterrupt, errors.NonFiniteLossError, OSError, RuntimeError) as e:
        return run.stopped(e)
    finally:
        run.close()
    return 0


def validate(args, models, data, device, epoch):
    """utils.evaluate's figures for the weights to be saved, after their BatchNorm statistics were
    made to fit them; NonFiniteLossError when the weights or the validation loss are not finite."""
    if data.bn_loader is not None:  # statistics that describe the weights being evaluated
        plain = models.raw if models.ema is None else models.ema.module
        utils.precise_bn(plain, data.bn_loader, device, args.channels_last, runtime.rank() == 0, data.normalize)
    else:  # BatchNorm statistics drift apart on each rank: evaluate (and save) rank 0's everywhere
        runtime.broadcast_buffers(models.eval)
    utils.check_finite(models.raw, epoch)
    result = utils.evaluate(models.eval, data.val_loader, device, len(data.split.classes), args.channels_last,
                            runtime.rank() == 0, normalize=data.normalize)
    if result["confusion"].sum() and not math.isfinite(result["val_loss"]):
        raise errors.NonFiniteLossError(f"the validation loss became {result['val_loss']} in epoch {epoch}")
    return result


class EpochReport:
    """What each epoch prints: its line (epoch_line), and what validation says beside it: a note when
    two epochs in a row showed no learning, the unreadable images, and each class's recall where
    some classes have far more training images than others."""

    def __init__(self, args, data, device):
        self.args, self.data, self.device, self.stuck, self.hinted = args, data, device, 0, False
        counts = torch.bincount(torch.as_tensor(data.split.train_labels), minlength=len(data.split.classes))
        self.imbalanced = bool(counts.max() >= 2 * counts.min())

    def epoch(self, row, result, history):
        classes = self.data.split.classes
        problem = reports.learning_problem(result["confusion"], classes)
        self.stuck = self.stuck + 1 if problem else 0  # epochs in a row whose validation shows no learning
        runtime.print0(epoch_line(self.args, row, history, len(classes), problem if self.stuck >= 2 else None))
        read, total = int(result["confusion"].sum()), len(self.data.split.val_images)
        if read < total:
            runtime.print0(f"  {total - read} of {total} validation images could not be read (named above); top-1 "
                           "is over the others")
        if self.imbalanced:
            runtime.print0("  " + reports.recall_line(result["confusion"], classes))
        if self.data.check is not None:  # a large folder's headers, read while this epoch ran
            self.data.check.report()
        if row["data_wait"] > DATA_WAIT_HINT and not self.hinted:
            self.hinted = True
            runtime.print0(f"  note: training waited for its images {100 * row['data_wait']:.0f} % of epoch "
                           f"{row['epoch']}; {feeding_tips(self.args, self.device)} would feed it faster",
                           file=sys.stderr)


DATA_WAIT_HINT = 0.3  # the share of an epoch spent waiting for data above which the run says what to try


def feeding_tips(args, device):
    """What would make the loader keep up, for this run: more workers where CPUs are idle, images
    stored nearer the training size (decoding a large photo is most of a worker's time), a lighter
    augmentation policy."""
    cpus = runtime.usable_cpus() // runtime.torchrun_local()[1]  # shared by the processes of this machine
    most = cpus - 1 if device.type == "cuda" else cpus  # a GPU's process needs a CPU of its own
    tips = [f"more --workers (now {args.workers}; {cpus} CPUs here)"] if args.workers < most else []
    tips.append(f"images stored smaller on disk (about {2 * args.img_size} px on the short side)")
    if args.auto_augment:
        tips.append(f"a lighter --auto-augment than {args.auto_augment}")
    return ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]


def epoch_line(args, row, history, num_classes, problem):
    """The line each epoch prints: losses, accuracy (top-5 only where it can be wrong), time, the
    share of it spent waiting for data, the time left for the whole run, and a note when
    validation has shown no learning for a while."""
    this_session = [r["epoch_seconds"] for r in history][-(row["epoch"] - history[0]["epoch"] + 1):]
    left = (args.epochs - row["epoch"]) * sum(this_session) / len(this_session)
    top5 = f"top-5 {row['val_top5']:.4f}  " if num_classes > 5 else ""
    line = (f"epoch {row['epoch']}/{args.epochs}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
            f"top-1 {row['val_top1']:.4f}  {top5}lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s  "
            f"{row['images_per_second']:.1f} img/s  data {100 * row['data_wait']:.0f} %"
            + (f"  run ends in {utils.duration(left)}" if left else ""))
    return line + (f"\n  not learning yet: {problem}" if problem else "")


if __name__ == "__main__":
    # SIGTERM, SIGHUP (a closed terminal) as Ctrl-C: last.pth stays, the resume command shown
    stop_signals.interrupt_on_signals(runtime.stop_watching_workers)
    if stop_signals.SIGNALLED:  # a library caught the interrupt while it loaded (numpy's lazy imports do) and went on
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
    except (errors.UsageError, errors.WeightsError) as e:
        print(f"error: {cli.printable(str(e))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before the first epoch: nothing to resume yet, and no run folder left
        print("\ninterrupted before training started", file=sys.stderr)
        code = 130
    except Exception:
        if not stop_signals.SIGNALLED:
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
