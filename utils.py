"""What train.py and predict.py share: the data split, transforms and loaders, the runtime
(device, mixed precision, distributed processes, RNG state), the train and eval loops, and the
files a run writes (metrics, plots). Checkpoints have their own module, checkpoint.py."""
import contextlib
import csv
import ctypes
import datetime
import functools
import json
import math
import os
import random
import sys
import time
from collections import namedtuple

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from tqdm import tqdm

from checkpoint import atomic_write
from my_dataset import MyDataSet

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
VAL_FOLDERS = ("val", "valid", "validation")


class UsageError(ValueError):
    """A flag or path the user gave cannot be used (a run folder, a device); the message says what to change."""


class DataError(UsageError):
    """The data folder cannot be used as given; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Finding and splitting the images
# ---------------------------------------------------------------------------------------------

def list_images(folder):
    """Image files under `folder` (recursively), sorted; hidden files and other types are ignored."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(parent, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
    return found


def check_image(path):
    """Why `path` cannot be used as an image, or None. Reads the header only, so it is cheap."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            w, h = img.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                return f"{w}x{h} pixels is over Pillow's decompression-bomb limit"
            if w == 0 or h == 0:
                return "image has no pixels"
    except Image.DecompressionBombError:
        return "over Pillow's decompression-bomb limit"
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except (OSError, SyntaxError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def class_folders(root):
    return sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def find_val_folder(root):
    """root/val (or valid, validation) when root holds a train/val split already, else None."""
    if not os.path.isdir(os.path.join(root, "train")):
        return None
    found = next((os.path.join(root, v) for v in VAL_FOLDERS if os.path.isdir(os.path.join(root, v))), None)
    # train/ holding class folders but nothing to validate on: never read train/ and test/ as two
    # classes (a class that is really called "train" holds images, not folders)
    if found is None and class_folders(os.path.join(root, "train")):
        raise DataError(f"{root} has a train/ folder but no val/ (or valid/, validation/) beside it: "
                        "add one, or point --data-path at the class folders themselves")
    return found


def scan_classes(root):
    """{class name: [usable image paths]} for the class folders under `root`, plus the broken files."""
    if not os.path.exists(root):
        raise DataError(f"data path {root} does not exist: pass --data-path pointing at a folder "
                        "with one sub-folder of images per class")
    if not os.path.isdir(root):
        raise DataError(f"data path {root} is a file, not a folder: pass the folder that holds one "
                        "sub-folder of images per class")
    images, broken = {}, []
    for name in class_folders(root):
        for path in list_images(os.path.join(root, name)):
            reason = check_image(path)
            if reason:
                broken.append((path, reason))
            else:
                images.setdefault(name, []).append(path)
        if name not in images:
            print(f"warning: class folder {os.path.join(root, name)} has no usable images; skipped",
                  file=sys.stderr)
    return images, broken


Split = namedtuple("Split", "train_images train_labels val_images val_labels classes broken")


def read_split_data(root, val_rate=0.2, seed=0):
    """Find the images under `root` and split them into training and validation sets.

    `root` holds one folder per class (like torchvision's ImageFolder; classes in sorted order),
    or `train/` and `val/` folders that each hold the same class folders (used as they are).
    Otherwise each class is split on its own, so every class with two or more images has at least
    one validation image; the split depends only on `seed` and the file names, so it is the same
    on every run and platform.
    """
    val_root = find_val_folder(root)
    if val_root:
        train, broken = scan_classes(os.path.join(root, "train"))
        val, val_broken = scan_classes(val_root)
        broken += val_broken
        if set(train) != set(val):
            raise DataError(f"{root}: train/ and {os.path.basename(val_root)}/ must hold the same class "
                            f"folders; only in train/: {sorted(set(train) - set(val)) or 'none'}, "
                            f"only in {os.path.basename(val_root)}/: {sorted(set(val) - set(train)) or 'none'}")
        classes = sorted(train)
        split = {c: (train[c], val[c]) for c in classes}
    else:
        if not 0 < val_rate < 1:
            raise DataError(f"--val-rate must be between 0 and 1 (got {val_rate})")
        images, broken = scan_classes(root)
        classes = sorted(images)
        split = {}
        for c in classes:
            files = list(images[c])
            # seeded per class by name: adding a class does not reshuffle the others
            random.Random(f"{seed}/{c}").shuffle(files)
            n_val = min(len(files) - 1, max(1, round(len(files) * val_rate)))
            split[c] = (sorted(files[n_val:]), sorted(files[:n_val]))
    report_broken(broken)
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} usable class folder(s) ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least 2: put each class's images in its own sub-folder")
    for c, (tr, va) in split.items():
        if not tr:
            raise DataError(f"class '{c}' in {root} has no training images; add images to it or remove it")
    out = Split([], [], [], [], classes, broken)
    for label, c in enumerate(classes):
        tr, va = split[c]
        out.train_images.extend(tr)
        out.train_labels.extend([label] * len(tr))
        out.val_images.extend(va)
        out.val_labels.extend([label] * len(va))
    if not out.val_images:
        raise DataError(f"{root} leaves no images for validation: add a second image to some class "
                        "or a val/ folder")
    return out


def report_broken(broken):
    if broken:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in broken)
        print(f"warning: {len(broken)} file(s) could not be used and are left out:\n{lines}", file=sys.stderr)


def write_class_indices(path, classes):
    """class_indices.json as the tutorial writes it: {"0": "daisy", ...}."""
    atomic_write_text(path, json.dumps({str(i): c for i, c in enumerate(classes)}, indent=4))


def read_class_indices(path):
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
        return [mapping[str(i)] for i in range(len(mapping))]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot read class names from {path} ({e}); it must map \"0\", \"1\", ... "
                        "to class names") from None


# ---------------------------------------------------------------------------------------------
# Transforms and loaders
# ---------------------------------------------------------------------------------------------

def build_transform(variant, img_size, train, scale=(0.08, 1.0), hflip=True, eval_sizes=None):
    """Train: random resized crop (+ flip). Eval: resize then centre crop with the variant's crop
    ratio, done on the uint8 tensor exactly as torchvision's own eval transform does it."""
    interpolation = InterpolationMode(variant.interpolation)
    tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(variant.mean, variant.std)]
    if train:
        return T.Compose([T.RandomResizedCrop(img_size, scale=scale, interpolation=interpolation, antialias=True),
                          T.RandomHorizontalFlip(0.5 if hflip else 0.0), T.ToImage(), *tail])
    resize, crop = eval_sizes or variant.eval_sizes(img_size)
    return T.Compose([T.ToImage(), T.Resize(resize, interpolation=interpolation, antialias=True),
                      T.CenterCrop(crop), *tail])


def train_draft_size(img_size, min_scale):
    """The side a large JPEG may be decoded at for training (see my_dataset.load_rgb): the smallest
    crop RandomResizedCrop takes, min_scale of the area, still has img_size pixels across."""
    return round(img_size / math.sqrt(min_scale))


def eval_draft_size(resize):
    """The same for evaluation: twice the resize, so the resize still antialiases as with a full decode."""
    return 2 * resize


def make_loader(dataset, batch_size, train, workers, device, sampler=None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        # a last batch of one image would break BatchNorm in training
        drop_last=train and len(dataset) > batch_size, collate_fn=MyDataSet.collate_fn)


# ---------------------------------------------------------------------------------------------
# Runtime: device, mixed precision, distributed processes, RNG state
# ---------------------------------------------------------------------------------------------

def choose_device(name, local_rank=0):
    """--device: auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps; under torchrun the local rank's GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name} is not a device: use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but PyTorch sees no CUDA GPU here: use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
        if local_rank and device.index is None:
            device = torch.device("cuda", local_rank)
    return device


@functools.lru_cache(maxsize=None)
def cpu_has_amx():
    """Intel AMX tiles make bf16 convolutions fast on a CPU; AVX512-BF16 alone measured slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def amp_dtype(mode, device):
    """The autocast dtype for --amp MODE ("auto", "bf16", "fp16", "off") on `device`, or None for fp32."""
    if mode == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_amx()
        mode = "bf16" if fast_bf16 else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def keep_freed_memory():
    """On a CPU, let the C allocator keep freed memory for the next step instead of handing it
    back to the system: every step frees and allocates the same activation-sized blocks, and
    glibc's default returns them, so each step pays the kernel again for fresh zeroed pages.
    Fixing the mmap threshold at its 32 MiB maximum and trimming only above 2 GiB made B0's
    training step 1.16x faster on a 2-core CPU (benchmark.py) for 4 % more resident memory.
    Linux with glibc only (True if applied); elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False


def default_workers():
    return min(os.cpu_count() or 1, 8)


def setup_distributed():
    """(rank, world size, local rank), initialising the process group when run under torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), local_rank


# the functions below are no-ops in a single process

def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def print0(*args, **kwargs):
    """print on the first process only."""
    if rank() == 0:
        print(*args, **kwargs)


def broadcast_buffers(model):
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def all_reduce_sum(tensor):
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]: [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Training and evaluation loops
# ---------------------------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    pass


def to_device(images, labels, device, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return (images.to(device, non_blocking=True, memory_format=memory_format),
            labels.to(device, non_blocking=True))


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, scheduler, scaler, ema=None,
                    show=True):
    """One pass over `loader`; returns (mean loss over all ranks, images/s). The scheduler steps
    once per optimizer step; from `args`: amp, grad_accum, clip_grad (0: off), channels_last."""
    model.train()
    for m in model.modules():  # frozen BatchNorm layers (--freeze-layers) keep their statistics too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad:
            m.eval()
    autocast, grad_accum = amp_dtype(args.amp, device), args.grad_accum
    loss_sum, seen = 0.0, 0  # plain floats: the loss is on the host already for the NaN check
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=None if show else True, leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for step, (images, labels) in enumerate(bar):
        if len(images) < 2:  # unreadable files left less than BatchNorm needs
            continue
        images, labels = to_device(images, labels, device, args.channels_last)
        update = (step + 1) % grad_accum == 0 or step + 1 == len(loader)
        # DDP: only the last micro-batch of an accumulation step all-reduces gradients
        sync = model.no_sync() if hasattr(model, "no_sync") and not update else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = criterion(model(images), labels)
            scaler.scale(loss / grad_accum).backward()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"the loss became {loss_value} in epoch {epoch}, step {step}")
        if update:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
        loss_sum, seen = loss_sum + loss_value * len(images), seen + len(images)
        if show:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.1f}")
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(torch.tensor([loss_sum, seen], dtype=torch.float64, device=device))
    return sums[0].item() / max(sums[1].item(), 1), sums[1].item() / elapsed


@torch.inference_mode()
def evaluate(model, loader, device, num_classes, channels_last=False, show=True):
    """Loss, top-1, top-5 (top-k capped at the class count) and the confusion matrix over every
    image in `loader`, summed over all ranks: each rank must see a disjoint part of the data.
    Always in fp32, as predict.py runs by default, so the accuracy reported is the one users get."""
    model.eval()
    n = num_classes
    confusion = torch.zeros(n * n, dtype=torch.int64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-5 hits
    for images, labels in tqdm(loader, desc="validate", disable=None if show else True, leave=False, dynamic_ncols=True):
        if len(images) == 0:
            continue
        images, labels = to_device(images, labels, device, channels_last)
        logits = model(images).float()
        sums[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.topk(min(5, n)).indices == labels[:, None]).any(1).sum()
        confusion += torch.bincount(labels * n + logits.argmax(1), minlength=n * n)
    all_reduce_sum(confusion)
    all_reduce_sum(sums)
    confusion = confusion.view(n, n).cpu()
    total = max(confusion.sum().item(), 1)
    return {"val_loss": sums[0].item() / total, "val_top1": confusion.trace().item() / total,
            "val_top5": sums[1].item() / total, "confusion": confusion}


# ---------------------------------------------------------------------------------------------
# Files: metrics, per-class figures, plots; all written whole (checkpoint.atomic_write)
# ---------------------------------------------------------------------------------------------

def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


METRIC_FIELDS = ["epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "epoch_seconds",
                 "images_per_second"]


def write_metrics(path, history):
    lines = [",".join(METRIC_FIELDS)]
    lines += [",".join(_fmt(row[k]) for k in METRIC_FIELDS) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(value):
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def per_class_rows(confusion, classes):
    """precision, recall, F1 and support of each class from a confusion matrix (rows = truth)."""
    rows = []
    for i, name in enumerate(classes):
        tp = confusion[i, i].item()
        predicted, support = confusion[:, i].sum().item(), confusion[i].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows


def write_per_class(path, confusion, classes):
    rows = per_class_rows(confusion, classes)
    lines = ["class,precision,recall,f1,support"]
    lines += [f"{csv_field(r['class'])},{r['precision']:.4f},{r['recall']:.4f},{r['f1']:.4f},{r['support']}"
              for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def csv_field(text):
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)


def plot_curves(history, path):
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["val_top1"] for r in history], "o-", label="top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in history], "o-", label="top-5")
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylim=(0, 1.02))
    ax_acc.legend()
    ax_lr.plot(epochs, [r["lr"] for r in history], "o-")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    save_figure(fig, path)


def plot_confusion(confusion, classes, path, title="confusion matrix"):
    plt = pyplot()
    n = len(classes)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    recall = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    im = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90 if n > 6 else 0)
    ax.set_yticklabels(classes)
    if n <= 30:  # counts stay legible up to about 30 classes
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if recall[i, j] > 0.5 else "black")
    save_figure(fig, path)


def plot_class_distribution(split, path):
    plt = pyplot()
    n = len(split.classes)
    train = torch.bincount(torch.as_tensor(split.train_labels), minlength=n).tolist()
    val = torch.bincount(torch.as_tensor(split.val_labels), minlength=n).tolist()
    fig, ax = plt.subplots(figsize=(min(4 + 0.5 * n, 30), 4))
    ax.bar(range(n), train, label=f"train ({sum(train)})")
    ax.bar(range(n), val, bottom=train, label=f"validation ({sum(val)})")
    ax.set_xticks(range(n))
    ax.set_xticklabels(split.classes, rotation=90 if n > 8 else 0)
    ax.set(ylabel="images", title="images per class")
    ax.legend()
    save_figure(fig, path)
