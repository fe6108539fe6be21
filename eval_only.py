"""train.py --eval-only: the validation figures of a trained model, without training it.

    python train.py --eval-only --weights weights/b0-digits/best.pth          # the images it was validated on
    python train.py --eval-only --weights best.pth --data-path other/ --tta   # other data, with mirror images

A checkpoint of this repo says what it was trained on (its data folder, image size, --seed and
--val-rate), so the same validation images are evaluated unless other flags are given.
predictions.csv and mistakes.png go to a new folder beside the weights, never over the run's own.
"""
import os
import sys

import checkpoint
import cli
import errors
import outputs
import reports
import runtime
import utils
from model import MAX_IMG_SIZE, MIN_IMG_SIZE, VARIANTS


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
                                runtime.rank() == 0, tta=tta, normalize=data.normalize)
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
        runtime.print0(f"  {cli.printable(row['class']):>20}  precision {row['precision']:.3f}  "
                       f"recall {row['recall']:.3f}  f1 {row['f1']:.3f}  support {row['support']}")
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
        raise errors.UsageError(f"--output-dir {folder} already holds {' and '.join(there)}: choose another "
                                "folder (without --output-dir: a new one beside the weights), or pass --exist-ok to "
                                "replace them")
    return folder


def trained_as(args, parser):
    """--eval-only --weights FILE, FILE a checkpoint of this repo: its META (else {}), and from it
    what evaluating it needs unless given now: its variant, its image size, and the --seed and
    --val-rate of its split, so that its validation images are the ones evaluated."""
    if not os.path.isfile(args.weights):
        return {}
    meta = checkpoint.read_meta(checkpoint.load_checkpoint(args.weights), args.weights)
    if not meta:
        return {}
    trained = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    fields = {"variant": (meta.get("variant"), lambda v: v in VARIANTS),
              "img_size": (meta.get("img_size"), lambda v: type(v) is int and MIN_IMG_SIZE <= v <= MAX_IMG_SIZE),
              "classes": (meta.get("classes"), lambda v: isinstance(v, list) and len(v) >= 2
                          and all(isinstance(c, str) for c in v)),
              "seed": (trained.get("seed", args.seed), lambda v: type(v) is int and 0 <= v < 2**32),
              "val_rate": (trained.get("val_rate", args.val_rate), lambda v: type(v) is float and 0 < v < 1)}
    for name, (value, valid) in fields.items():
        if not valid(value):
            raise errors.WeightsError(f"{args.weights}: its metadata field {name} is not usable ({str(value)[:60]}); "
                                      "it is not a checkpoint as train.py writes them")
    if args.img_size is None:
        args.img_size = meta["img_size"]
    elif args.img_size != meta["img_size"]:
        runtime.print0(f"note: evaluating at --img-size {args.img_size}; {args.weights} was trained at "
                       f"{meta['img_size']} px", file=sys.stderr)
    for flag, field in (("model", "variant"), ("seed", "seed"), ("val_rate", "val_rate")):
        if getattr(args, flag) == parser.get_default(flag):
            setattr(args, flag, fields[field][0])
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
