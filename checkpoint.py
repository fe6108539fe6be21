"""best.pth and last.pth: the one place that knows how this repo's checkpoints are laid out,
written and read.

    import checkpoint
    ckpt = checkpoint.load_checkpoint("weights/b0-digits/best.pth")   # plain dicts and tensors
    ckpt["model"], ckpt["meta"]["classes"], ckpt["meta"]["img_size"]

Both files are dicts of plain types, so `torch.load(weights_only=True)` opens them:

    best.pth  {"model": state_dict, "meta": META, "epoch": int, "val_top1": float}
    last.pth  {"model", "meta", "epoch", "best_top1", "history", "best_confusion", "best_predictions",
               "optimizer", "scheduler", "scaler", "ema", "rng"}: everything --resume needs

META describes the model so that predict.py needs nothing but the file: "format" (FORMAT below),
"variant", "classes", "img_size", "bn_eps", "mean", "std", "interpolation", "eval_resize",
"eval_crop" and "args", the training flags. Files written before "format" existed are format 1,
which has the same fields. Every write is atomic: a crash leaves the old file or the new one.
"""
import contextlib
import os
import pickle
import signal
import threading

import torch

from outputs import atomic_write

FORMAT = 2  # 1: no "format" field; 2: "format" added. Raise it when a field changes meaning.


class WeightsError(ValueError):
    """A weights or checkpoint file cannot be used; the message names the file and says why."""


def load_checkpoint(path):
    """torch.load with weights_only=True: a file that would run code on unpickling is refused."""
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
    return dict(meta, format=version)


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


def new_progress():
    """Where a run stands, as last.pth keeps it: the last finished epoch, the best val top-1 so far,
    the metrics of each epoch, and the best epoch's confusion matrix and per-image predictions
    (utils.evaluate's "predictions"; None in runs saved before they were kept)."""
    return {"epoch": 0, "best_top1": -1.0, "history": [], "best_confusion": None, "best_predictions": None}


def save_last(path, model, meta, progress, optimizer, scheduler, scaler, ema, rng):
    """The whole state of a run: its `progress` (new_progress), the model, optimizer, schedule,
    scaler and EMA, and one RNG state per process."""
    save({"model": model.state_dict(), "meta": meta, **progress, "optimizer": optimizer.state_dict(),
          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
          "ema": ema.state_dict() if ema is not None else None, "rng": rng}, path)


def load_resume(path):
    """A last.pth to continue from, checked to be one; WeightsError otherwise."""
    if not os.path.isfile(path):
        raise WeightsError(f"--resume: no checkpoint at {path}; pass the run's last.pth, "
                           "e.g. --resume weights/b0-digits/last.pth")
    ckpt = load_checkpoint(path)
    meta = read_meta(ckpt, path)
    if "optimizer" not in ckpt or "args" not in meta:
        raise WeightsError(f"--resume: {path} is not a last.pth written by train.py; to start from its "
                           "weights use --weights instead")
    ckpt["meta"] = meta
    return ckpt


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
    """Ctrl-C and SIGTERM wait until the block ends. torch.save stopped half-way leaves its zip
    writer broken, and that ends in a RuntimeError instead of the interrupt the user asked for."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
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


