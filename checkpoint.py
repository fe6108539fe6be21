"""best.pth and last.pth: the one place that knows how this repo's checkpoints are laid out,
written and read.

    import checkpoint
    ckpt = checkpoint.load_checkpoint("weights/b0-digits/best.pth")   # plain dicts and tensors
    ckpt["model"], ckpt["meta"]["classes"], ckpt["meta"]["img_size"]
    run = checkpoint.load_resume("weights/b0-digits/last.pth")         # a Resume, every field checked
    run.progress.epoch, run.meta["args"], run.optimizer

Both files are dicts of plain types, so `torch.load(weights_only=True)` opens them:

    best.pth  {"model": state_dict, "meta": META, "epoch": int, "val_top1": float}
    last.pth  {"model", "meta", "epoch", "best_top1", "best_epoch", "history", "best_confusion",
               "best_predictions", "split", "optimizer", "scheduler", "scaler", "ema", "rng"}:
               everything --resume needs (files written before "best_epoch" and "split" existed lack them)

META describes the model so that predict.py needs nothing but the file: "format" (FORMAT below),
"variant", "classes", "img_size", "bn_eps", "mean", "std", "interpolation", "eval_resize",
"eval_crop" and "args", the training flags. Files written before "format" existed are format 1,
which has the same fields. Every write is atomic: a crash leaves the old file or the new one.
"""
import contextlib
import dataclasses
import os
import pickle
import signal
import threading
import zipfile
from typing import NamedTuple, Optional

import torch

from errors import WeightsError
from model import MAX_IMG_SIZE, MIN_IMG_SIZE
from outputs import atomic_write

FORMAT = 2  # 1: no "format" field; 2: "format" added. Raise it when a field changes meaning.



def load_checkpoint(path):
    """torch.load with weights_only=True: a file that would run code on unpickling is refused."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise WeightsError(f"{path} is not a regular file (a FIFO, socket or device): reading it could wait "
                           "forever; pass the .pth file itself")
    if problem := archive_problem(path):
        raise WeightsError(f"refusing to load {path}: {problem}; torch.save writes its entries uncompressed, so "
                           "this file was made to exhaust the memory (or damaged)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}; check the --weights path") from None
    except IsADirectoryError:
        raise WeightsError(f"{path} is a folder; pass the .pth file inside it") from None
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line.upper()]
        if not blocked:  # not a pickle at all
            raise WeightsError(f"{path} is not a PyTorch checkpoint: pass a .pth file saved with torch.save") from None
        raise WeightsError(f"refusing to load {path}: unpickling it would run code or build objects "
                           f"that are not plain tensors ({blocked[0][:100]}); use weights from a source "
                           "you trust, saved as a state_dict") from None
    except Exception:  # any other way a file can fail to be a checkpoint: text, truncated, empty
        raise WeightsError(f"{path} is not a PyTorch checkpoint: pass a .pth file saved with torch.save") from None


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MOST_VALUES = 10**9  # more than any tensor of B7 (its largest has 2.5 million values)


def tensor_problem(name, t):
    """What makes tensor `name` of a weights file unusable, judged without touching its values (a
    file's tensor can claim 10^12 values over a few bytes of storage), or None: a weight stored as
    a dense, CPU tensor of floating-point numbers, backed by storage for all its values; a
    BatchNorm's batch count as an integer."""
    if t.layout != torch.strided:
        return f"a {str(t.layout).replace('torch.', '')} tensor, not a dense one"
    if t.device.type != "cpu":
        return f"a tensor on the {t.device.type} device, which holds no values"
    if t.numel() > MOST_VALUES:
        return f"a tensor of {t.numel():,} values, more than any EfficientNet's"
    if t.untyped_storage().nbytes() < t.numel() * t.element_size():
        return f"a tensor of {t.numel():,} values stored in {t.untyped_storage().nbytes():,} bytes"
    if name.endswith(("num_batches_tracked", "n_averaged")):  # counts: BatchNorm's batches, the EMA's updates
        return None if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool else \
            f"stored as {str(t.dtype).replace('torch.', '')}, not as a whole number"
    if t.dtype not in FLOATS:
        return f"stored as {str(t.dtype).replace('torch.', '')}, not as floating-point numbers"
    return None


MOST_BYTES = 4 << 30  # a B7 last.pth (weights, EMA, optimizer state) holds about 1.1 GB


def archive_problem(path):
    """What is wrong with a .pth zip archive before torch inflates and copies any of it (a 1 MB file
    can declare a 1 GiB entry): an entry that inflates to more than 20 times its packed size, or
    more than MOST_BYTES in all. None for a sound archive, and for a file that is no zip (an older
    torch.save format, or no checkpoint: torch.load says so)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED and entry.file_size > 20 * max(entry.compress_size, 1 << 10):
            return (f"its entry {entry.filename[:80]} inflates from {entry.compress_size:,} to "
                    f"{entry.file_size:,} bytes")
    total = sum(entry.file_size for entry in entries)
    if total > MOST_BYTES:
        return f"its entries hold {total:,} bytes, more than any EfficientNet checkpoint"
    return None


def read_meta(obj, where="weights"):
    """META of a loaded checkpoint of this repo ({} for anyone else's file), checked for a format
    this code can read."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return {}
    version = meta.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise WeightsError(f"{where} was written by a newer version of these scripts (checkpoint format "
                           f"{version}, this one reads up to {FORMAT}): update the scripts")
    problem = meta_problem(meta)
    if problem:
        field, wanted = problem
        raise WeightsError(f"{where}: meta[\"{field}\"] must be {wanted}; this checkpoint was not written by "
                           "train.py as it stands (pass the run's own best.pth, or a plain state_dict)")
    return dict(meta, format=version)


INTERPOLATIONS = ("bilinear", "bicubic")
EVAL_FIELDS = ("img_size", "eval_resize", "eval_crop", "interpolation", "mean", "std")


def preprocessing_problem(resize, crop, interpolation, mean, std):
    """(field, what it must be) for the first eval setting that predict.py cannot use as it is, or
    None. The file may come from anyone: a resize of 60,000 px would allocate gigabytes per image,
    a std of 0 turns every probability into NaN."""
    if not (type(crop) is int and MIN_IMG_SIZE <= crop <= MAX_IMG_SIZE):
        return "crop", f"a whole number of pixels from {MIN_IMG_SIZE} to {MAX_IMG_SIZE}"
    if not (type(resize) is int and crop <= resize <= 2 * crop):
        return "resize", "a whole number of pixels from crop to twice crop"
    if interpolation not in INTERPOLATIONS:
        return "interpolation", " or ".join(INTERPOLATIONS)
    for field, values, low in (("mean", mean, -1e3), ("std", std, 1e-6)):
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(type(x) in (int, float) and low <= x <= 1e3 for x in values)):  # NaN fails both
            return field, "3 numbers" + (" above 0" if field == "std" else "")
    return None


def meta_problem(meta):
    """(field, what it must be) for the first field of META that cannot be used as it is, or None."""
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and classes
                                    and all(isinstance(c, str) for c in classes)):
        return "classes", "a list of class names"
    if "args" in meta and not isinstance(meta["args"], dict):
        return "args", "an object of training flags"
    eps = meta.get("bn_eps", 1e-3)
    if not (type(eps) in (int, float) and 0 < eps < 1):
        return "bn_eps", "a number between 0 and 1"
    present = [field for field in EVAL_FIELDS if field in meta]
    if not present:  # a file that does not describe its preprocessing: the variant's own is used
        return None
    if len(present) < len(EVAL_FIELDS):
        missing = next(field for field in EVAL_FIELDS if field not in meta)
        return missing, f"given with {present[0]} (the eval preprocessing is all or nothing)"
    if not (type(meta["img_size"]) is int and meta["img_size"] >= MIN_IMG_SIZE):
        return "img_size", f"a whole number of pixels, {MIN_IMG_SIZE} or more"
    problem = preprocessing_problem(meta["eval_resize"], meta["eval_crop"], meta["interpolation"], meta["mean"],
                                    meta["std"])
    if problem and problem[0] in ("crop", "resize"):  # named as META names them
        problem = ("eval_" + problem[0], problem[1])
    return problem


def make_meta(args, classes, variant, bn_eps):
    """META for a run: the model's self-description plus the flags it was trained with."""
    resize, crop = variant.eval_sizes(args.img_size)
    return {"format": FORMAT, "variant": args.model, "classes": list(classes), "img_size": args.img_size,
            "bn_eps": bn_eps, "mean": list(variant.mean), "std": list(variant.std),
            "interpolation": variant.interpolation, "eval_resize": resize, "eval_crop": crop,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}


def save_best(path, model, meta, epoch, val_top1):
    """The weights to predict with: `model` is the plain module (never a DDP or compiled wrapper)."""
    save({"model": model.state_dict(), "meta": meta, "epoch": epoch, "val_top1": val_top1}, path)


@dataclasses.dataclass
class Progress:
    """Where a run stands, as last.pth keeps it: the last finished epoch, the best val top-1 so far
    and its epoch, the metrics of each epoch (dicts as reports.write_metrics writes them), the best
    epoch's confusion matrix and per-image predictions (utils.evaluate's "predictions", indices into
    the split's validation images), and the split itself (pack_split). None where a run saved
    before these were kept lacks them."""
    epoch: int = 0
    best_top1: float = -1.0
    best_epoch: Optional[int] = None
    history: list = dataclasses.field(default_factory=list)
    best_confusion: Optional[torch.Tensor] = None
    best_predictions: Optional[dict] = None
    split: Optional[dict] = None


def pack_split(root, train_images, train_labels, val_images, val_labels):
    """The run's training and validation files as last.pth keeps them, so that a resumed run goes
    on with the same ones whatever the folder holds by then: paths relative to the data folder
    `root` (the data may move), NUL-separated UTF-8 bytes (names that are not UTF-8 keep their
    bytes), and the labels as tensors. A million paths: packed in 0.4 s once per run, 39 MB in
    last.pth, 0.14 s more per save (measured on a 2-core CPU)."""
    prefix = os.path.join(root, "")

    def pack(paths):
        relative = (p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths)
        return "\0".join(relative).encode("utf-8", "surrogateescape")

    return {"train": pack(train_images), "train_labels": torch.as_tensor(train_labels, dtype=torch.int64),
            "val": pack(val_images), "val_labels": torch.as_tensor(val_labels, dtype=torch.int64)}


def unpack_split(packed, root, where="last.pth"):
    """(train_images, train_labels, val_images, val_labels) of pack_split, the paths under `root`;
    WeightsError when the record is not one (the file came from elsewhere)."""
    try:
        out = []
        for part in ("train", "val"):
            data, labels = packed[part], packed[f"{part}_labels"]
            paths = [os.path.join(root, p) for p in data.decode("utf-8", "surrogateescape").split("\0")] if data else []
            labels = labels.tolist()
            if len(paths) != len(labels) or not all(type(v) is int and v >= 0 for v in labels):
                raise ValueError
            out += [paths, labels]
        return tuple(out)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise WeightsError(f"--resume: {where} holds a damaged record of the run's training and validation "
                           "files; it cannot be resumed as it was") from None


def save_last(path, model, meta, progress, optimizer, scheduler, scaler, ema, rng):
    """The whole state of a run: its Progress, the model, optimizer, schedule, scaler and EMA, and
    one RNG state per process."""
    save({"model": model.state_dict(), "meta": meta, **vars(progress), "optimizer": optimizer.state_dict(),
          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
          "ema": ema.state_dict() if ema is not None else None, "rng": rng}, path)


class Resume(NamedTuple):
    """A last.pth as --resume reads it: every field checked to be of its kind."""
    path: str
    model: dict
    meta: dict  # META; meta["args"]: the run's flags
    progress: Progress
    optimizer: dict
    scheduler: dict
    scaler: dict
    ema: Optional[dict]  # None: a run with --no-ema
    rng: list  # one RNG state per process of the run

    @property
    def args(self):
        """The flags the run was trained with (train.py's argparse names)."""
        return self.meta["args"]

    @property
    def classes(self):
        return self.meta["classes"]

    @property
    def weights(self):
        """The model's part, as weight_files.read_weights reads a checkpoint."""
        return {"model": self.model, "meta": self.meta}


def load_resume(path):
    """A last.pth to continue from, checked to be one (Resume); WeightsError otherwise."""
    if not os.path.isfile(path):
        raise WeightsError(f"--resume: no checkpoint at {path}; pass the run's last.pth, "
                           "e.g. --resume weights/b0-digits/last.pth")
    ckpt = load_checkpoint(path)
    meta = read_meta(ckpt, path)
    if "optimizer" not in ckpt or "args" not in meta:
        raise WeightsError(f"--resume: {path} is not a last.pth written by train.py; to start from its "
                           "weights use --weights instead")
    start = Progress()  # fields added since the run was saved: their start value
    progress = Progress(**{name: ckpt.get(name, getattr(start, name)) for name in vars(start)})
    resume = Resume(path, ckpt["model"], meta, progress,
                    *(ckpt.get(k) for k in ("optimizer", "scheduler", "scaler", "ema", "rng")))
    if problem := resume_problem(resume):
        field, wanted = problem
        raise WeightsError(f"--resume: {path}: its {field} must be {wanted}; this last.pth was not written by "
                           "train.py as it stands, or it is damaged")
    return resume


def resume_problem(resume):
    """(field, what it must be) for the first field of a last.pth that --resume cannot use, or None.
    The tensors inside (weights, optimizer state) are checked where they are loaded."""
    p = resume.progress
    whole = lambda v: type(v) is int and v >= 0  # noqa: E731
    checks = [("epoch", whole(p.epoch), "a whole number of epochs"),
              ("best_top1", type(p.best_top1) in (int, float), "a number"),
              ("best_epoch", p.best_epoch is None or whole(p.best_epoch), "an epoch number"),
              ("history", isinstance(p.history, list) and all(isinstance(r, dict) for r in p.history),
               "a list of each epoch's metrics"),
              ("best_confusion", p.best_confusion is None or isinstance(p.best_confusion, torch.Tensor)
               and p.best_confusion.dim() == 2, "a matrix"),
              ("best_predictions", p.best_predictions is None or isinstance(p.best_predictions, dict),
               "a table of predictions"),
              ("split", p.split is None or isinstance(p.split, dict), "a record of the run's files"),
              ("model", isinstance(resume.model, dict), "a state_dict"),
              ("optimizer", isinstance(resume.optimizer, dict), "an optimizer state"),
              ("scheduler", isinstance(resume.scheduler, dict), "a schedule state"),
              ("scaler", resume.scaler is None or isinstance(resume.scaler, dict), "a grad-scaler state"),
              ("ema", resume.ema is None or isinstance(resume.ema, dict), "a state_dict"),
              ("rng", isinstance(resume.rng, list) and resume.rng, "a list of RNG states")]
    return next(((field, wanted) for field, ok, wanted in checks if not ok), None)


def state_problem(resume, optimizer, ema):
    """(what, why) for the first part of a last.pth's optimizer or EMA state that does not fit this
    run's `optimizer` and `ema` (recipe.EMA or None), or None; judged before any of it is loaded,
    without touching a value: its groups and their sizes, and each tensor's kind and shape (a file
    from elsewhere would otherwise fail in the first step, or load silently into the wrong shape)."""
    groups, state = resume.optimizer.get("param_groups"), resume.optimizer.get("state")
    if not (isinstance(groups, list) and isinstance(state, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return "optimizer", "not an optimizer state"
    sizes, wanted = [len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups]
    if sizes != wanted:
        return "optimizer", f"a state of {sizes} parameters per group, where this model's optimizer has {wanted}"
    shapes = dict(zip((i for g in groups for i in g["params"]),
                      (p.shape for g in optimizer.param_groups for p in g["params"])))
    for index, entry in state.items():
        if index not in shapes or not isinstance(entry, dict):
            return f"optimizer state {str(index)[:20]}", "not the state of one of the model's parameters"
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            where = f"optimizer state {index}.{str(name)[:40]}"
            if problem := tensor_problem(str(name), value):
                return where, problem
            if value.dim() and value.shape != shapes[index]:
                return where, f"of shape {list(value.shape)} where its parameter's is {list(shapes[index])}"
    return ema_problem(resume, ema)


def ema_problem(resume, ema):
    """(what, why) for the first entry of a last.pth's EMA that this run's `ema` (recipe.EMA or
    None) cannot load, or None."""
    if ema is not None and resume.ema is not None:
        expected = {k: v.shape for k, v in ema.state_dict().items()}
        if set(resume.ema) != set(expected):
            key = next(iter(set(resume.ema) ^ set(expected)))
            return "ema", f"{'without' if key in expected else 'with'} {str(key)[:80]}, unlike this model's average"
        for key, value in resume.ema.items():
            if not isinstance(value, torch.Tensor):
                return f"ema {key}", "not a tensor"
            if problem := tensor_problem(key, value):
                return f"ema {key}", problem
            if value.shape != expected[key]:
                return f"ema {key}", f"of shape {list(value.shape)} where the model's is {list(expected[key])}"
    return None


def averaged_weights(ckpt):
    """The EMA weights of a last.pth (what its validation scored and best.pth saves), or None: its
    "model" holds the raw training weights, which predict worse on small data."""
    ema = ckpt.get("ema") if isinstance(ckpt, dict) and "optimizer" in ckpt else None
    if not isinstance(ema, dict):
        return None
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")} or None


def save(obj, path):
    obj = on_cpu(obj)
    with signals_held():
        atomic_write(path, lambda f: torch.save(obj, f))


def on_cpu(obj):
    """`obj` with every tensor in it (state dicts, optimizer state, RNG states, nested in dicts,
    lists and tuples) copied to the CPU. A tensor keeps its device in the file: one saved from a
    GPU would make torch.load without map_location fail on a machine that has none."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's layer versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends. torch.save stopped half-way leaves its
    zip writer broken, and that ends in a RuntimeError instead of the interrupt the user asked for."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        yield  # signals reach only the main thread; a handler set outside Python cannot be put back
        return
    caught = []
    for s in handlers:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


