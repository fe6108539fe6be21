"""What train.py and predict.py share: the data split, transforms and loaders, the runtime
(device, mixed precision, distributed processes, RNG state), the train and eval loops, and the
files a run writes (metrics, plots). Checkpoints have their own module, checkpoint.py."""
import argparse
import contextlib
import csv
import ctypes
import datetime
import difflib
import functools
import json
import math
import multiprocessing
import os
import platform
import random
import signal
import sys
import time
import warnings
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from checkpoint import atomic_write
from my_dataset import MyDataSet, load_rgb, shape_problem

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
VAL_FOLDERS = ("val", "valid", "validation")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" where there is a default to show and the help text does not
    already say it."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False \
                or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: no abbreviations (--epoch is a typo, not --epochs), and a close flag
    name suggested for a flag it does not know (--img_size: did you mean --img-size?)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = [flag for action in self._actions for flag in action.option_strings]
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    typed = word.split("=")[0].replace("_", "-").lower()
                    close = difflib.get_close_matches(typed, flags, n=1, cutoff=0.6)
                    if close:
                        message += f" (did you mean {close[0]}?)"
        super().error(message)


class UsageError(ValueError):
    """A flag or path the user gave cannot be used (a run folder, a device); the message says what to change."""


class DataError(UsageError):
    """The data folder cannot be used as given; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Finding and splitting the images
# ---------------------------------------------------------------------------------------------

def list_images(folder, rejected=None, foreign=None, links=None):
    """Image files under `folder`, recursively and following links, in a stable order (a folder's
    files by name, then its sub-folders by name); hidden files and other types are ignored.

    Each real directory is visited once, so a link back into the tree (`self -> .`) cannot repeat
    or loop. `foreign(real_path)` may say why a link's target is not this folder's to take (it
    belongs to another class, or lies above the data); such a link is not followed. Anything
    named like an image that is not a regular file (a FIFO, a socket, a broken link) is never
    opened. Both go to `rejected` as (path, why). Links followed (to images or folders) go to `links`.
    """
    found, seen = [], set()
    rejected = [] if rejected is None else rejected

    def walk(path):
        info = os.stat(path)
        if (info.st_dev, info.st_ino) in seen:
            return
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(path) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        entries = [e for e in entries if not (e.is_symlink() and foreign and refused(e))]
        for e in entries:
            if e.name.lower().endswith(IMG_EXTENSIONS) and not e.is_dir():
                if e.is_file():
                    found.append(e.path)
                    if links is not None and e.is_symlink():
                        links.add(e.path)
                else:
                    rejected.append((e.path, "not a regular file (a FIFO, socket, device or broken link); "
                                             "not opened"))
        for e in entries:
            if e.is_dir():
                if links is not None and e.is_symlink():
                    links.add(e.path)
                walk(e.path)

    def refused(entry):
        if not (entry.is_dir() or entry.name.lower().endswith(IMG_EXTENSIONS)):
            return False
        why = foreign(os.path.realpath(entry.path))
        if why:
            rejected.append((entry.path, why))
        return bool(why)

    walk(folder)
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
            if problem := shape_problem(w, h):
                return problem
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
    """{class name: [image paths]} for the class folders under `root`, plus the files left out.
    Only folders are read here, no file is opened: check_images finds the broken ones.

    A class holds what its folder holds, links followed, but a link to another class's folder or
    file, or back up to the data folder, is not followed (the other class keeps what is its own,
    whatever the order); a real file reached twice in other ways (two links to one file outside
    the data, or a link and the file itself) counts once, for the first path, and the others are
    named."""
    if not os.path.exists(root):
        raise DataError(f"data path {root} does not exist: pass --data-path pointing at a folder "
                        "with one sub-folder of images per class")
    if not os.path.isdir(root):
        raise DataError(f"data path {root} is a file, not a folder: pass the folder that holds one "
                        "sub-folder of images per class")
    names = class_folders(root)
    top = os.path.realpath(root)
    owners = {os.path.realpath(os.path.join(root, name)): name for name in names}

    def foreign_to(name):
        """Why a link in class `name` to `real` is not followed or counted there, or None."""
        def why(real):
            if top == real or top.startswith(real.rstrip(os.sep) + os.sep):
                return "a link back up to the data folder or above it; not followed"
            probe = real
            while probe not in owners and os.path.dirname(probe) != probe:
                probe = os.path.dirname(probe)
            if owners.get(probe, name) != name:
                return f"a link into class folder '{owners[probe]}'; counted there, not here"
            return None
        return why

    broken = []
    links = {folder for folder in (os.path.join(root, name) for name in names) if os.path.islink(folder)}
    listed = {name: list_images(os.path.join(root, name), broken, foreign_to(name), links) for name in names}
    if links:  # only a link can reach a file a second time: count each real file once
        first_path = {}
        for name, paths in listed.items():
            kept = listed[name] = []
            for path in paths:
                real = os.path.realpath(path) if path in links else real_path(path)
                if real in first_path:
                    broken.append((path, f"the same file as {first_path[real]}; counted once"))
                else:
                    first_path[real] = path
                    kept.append(path)
    for name, paths in listed.items():
        if not paths:
            print(f"warning: class folder {os.path.join(root, name)} has no images; skipped", file=sys.stderr)
    return {name: paths for name, paths in listed.items() if paths}, broken


@functools.lru_cache(maxsize=4096)
def real_folder(folder):
    return os.path.realpath(folder)


def real_path(path):
    """os.path.realpath of a file that is not itself a link, its folder's part looked up once per
    folder (the folder may be reached through a link)."""
    folder, name = os.path.split(path)
    return os.path.join(real_folder(folder), name)


def check_images(paths):
    """[(path, why)] for the files among `paths` that cannot be used as images (headers only)."""
    return [(p, why) for p in paths if (why := check_image(p))]


Split = namedtuple("Split", "train_images train_labels val_images val_labels classes broken unchecked")

# Up to this many files, every header is read before training starts (about 0.1 s per 1,000 files).
# A larger folder starts at once; its files are checked while the first epoch runs (train.py).
CHECK_AT_START = 5000


def read_split_data(root, val_rate=0.2, seed=0, check_at_start=None):
    """Find the images under `root` and split them into training and validation sets.

    `root` holds one folder per class (like torchvision's ImageFolder; classes in sorted order),
    or `train/` and `val/` folders that each hold the same class folders (used as they are).
    Otherwise each class is split on its own, so every class with two or more images has at least
    one validation image; the split depends only on `seed` and the file names, so it is the same
    on every run and platform, and whether or when a broken file is found does not move the others.

    Broken files (and links that are not followed) are named on stderr and left out. With more
    than `check_at_start` files the headers are not read here: Split.unchecked lists the files
    for check_images, and the data loader skips an unreadable file whenever it meets one.
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
        split = {c: (train[c], val[c]) for c in sorted(train)}
        folders = (os.path.join(root, "train"), val_root)
    else:
        if not 0 < val_rate < 1:
            raise DataError(f"--val-rate must be between 0 and 1 (got {val_rate})")
        images, broken = scan_classes(root)
        split = {}
        for c in sorted(images):
            files = list(images[c])
            # seeded per class by name: adding a class does not reshuffle the others. The name's
            # bytes as on disk, so that names that are not UTF-8 work too (the same seed for those that are)
            random.Random(f"{seed}/{c}".encode("utf-8", "surrogateescape")).shuffle(files)
            n_val = min(len(files) - 1, max(1, round(len(files) * val_rate)))
            split[c] = (sorted(files[n_val:]), sorted(files[:n_val]))
        folders = (root,)
    everything = [p for tr, va in split.values() for p in tr + va]
    limit = CHECK_AT_START if check_at_start is None else check_at_start
    unchecked = everything if len(everything) > limit else []
    if not unchecked:
        bad = check_images(everything)
        broken += bad
        split = drop_files(split, {p for p, _ in bad}, folders)
    report_broken(broken)
    classes = sorted(split)
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} usable class folder(s) ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least 2: put each class's images in its own sub-folder")
    for c, (tr, va) in split.items():
        if not tr:
            raise DataError(f"class '{c}' in {root} has no training images; add images to it or remove it")
    out = Split([], [], [], [], classes, broken, unchecked)
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


def drop_files(split, bad, folders):
    """The split without the files in `bad`; a class left with no files at all is skipped."""
    kept = {}
    for c, (tr, va) in split.items():
        tr, va = [p for p in tr if p not in bad], [p for p in va if p not in bad]
        if tr or va:
            kept[c] = (tr, va)
        else:
            where = " and ".join(os.path.join(folder, c) for folder in folders)
            print(f"warning: class folder {where} has no usable images; skipped", file=sys.stderr)
    return kept


class BackgroundCheck:
    """check_images over `paths` in a process of its own, at the lowest CPU priority, while training
    goes on (a thread would compete with the training loop for Python's lock); report() names the
    broken files in the same words as read_split_data would have, once, when the check is done."""

    def __init__(self, paths):
        # on Linux the child has `paths` without a copy through a pipe; macOS frameworks do not survive a fork
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.results, send = context.Pipe(duplex=False)
        self.process = context.Process(target=self.check, args=(paths, send), daemon=True)
        self.process.start()
        send.close()
        self.reported = False

    @staticmethod
    def check(paths, send):
        os.nice(19)
        send.send(check_images(paths))

    def report(self, wait=False):
        """The broken files, named on stderr, when the check has ended (or after waiting for it); None
        while it runs, or after the first report."""
        if self.reported or not (wait or self.results.poll()):
            return None
        self.reported = True
        try:
            broken = self.results.recv()
        except EOFError:  # the checking process was killed: the loader still skips what it cannot read
            return None
        finally:
            self.process.join()
        report_broken(broken)
        return broken


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

AUTO_AUGMENT = ("ta_wide", "ra", "augmix", "imagenet")


def build_transform(variant, img_size, train, scale=(0.08, 1.0), hflip=True, eval_sizes=None,
                    auto_augment=None, ra_magnitude=9, random_erase=0.0):
    """Train: random resized crop, flip, an optional policy of AUTO_AUGMENT (TrivialAugmentWide,
    RandAugment, AugMix or AutoAugment's ImageNet policy) and optional random erasing. Eval:
    EvalTransform, resize then centre crop with the variant's crop ratio."""
    if not train:
        return EvalTransform(*(eval_sizes or variant.eval_sizes(img_size)), variant.interpolation,
                             variant.mean, variant.std)
    from torchvision.transforms import InterpolationMode  # training only: torchvision takes a second to import
    from torchvision.transforms import v2 as T
    bilinear = InterpolationMode.BILINEAR
    policy = {None: lambda: [], "ta_wide": lambda: [T.TrivialAugmentWide(interpolation=bilinear)],
              "ra": lambda: [T.RandAugment(magnitude=ra_magnitude, interpolation=bilinear)],
              "augmix": lambda: [T.AugMix(interpolation=bilinear)],
              "imagenet": lambda: [T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, bilinear)]}[auto_augment]()
    erase = [T.RandomErasing(random_erase, value=0)] if random_erase else []
    return T.Compose([T.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode(variant.interpolation),
                                          antialias=True),
                      T.RandomHorizontalFlip(0.5 if hflip else 0.0), T.ToImage(), *policy,
                      T.ToDtype(torch.float32, scale=True), T.Normalize(variant.mean, variant.std), *erase])


class EvalTransform:
    """PIL image -> normalised float tensor: the shorter side resized to `resize` (antialiased, on
    the uint8 pixels), the centre `crop` x `crop` cut out, scaled to [0, 1] and normalised. The
    arithmetic of torchvision's v2 eval transform step for step, equal to the bit (a test holds
    it there), in plain PyTorch: predict.py and validation start without importing torchvision."""

    def __init__(self, resize, crop, interpolation, mean, std):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img):
        x = torch.as_tensor(np.array(img, copy=True)).view(img.height, img.width, -1).permute(2, 0, 1)
        x = self.resized(x)
        x = centre_crop(x, self.crop)
        return x.to(torch.float32).mul_(1.0 / 255).sub(self.mean).div_(self.std)

    def resized(self, x):
        channels, h, w = x.shape
        if w <= h:
            size = int(self.resize * h / w), self.resize
        else:
            size = self.resize, int(self.resize * w / h)
        if size == (h, w):
            return x
        x = x.reshape(1, channels, h, w)
        if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != x.stride(0):
            x = x.as_strided(x.shape, (x.numel(),) + x.stride()[1:])  # so that the output is channels-last too
        # uint8 in and out where PyTorch has the kernel (bicubic; bilinear with AVX2), else via float32
        native = self.interpolation == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
            or platform.machine() in ("aarch64", "arm64")
        y = F.interpolate(x if native else x.float(), size=size, mode=self.interpolation, align_corners=False,
                          antialias=True)
        if not native:
            y = (y.clamp_(0, 255) if self.interpolation == "bicubic" else y).round_().to(torch.uint8)
        return y.reshape(channels, *size)


def centre_crop(x, crop):
    """The centre crop x crop of a CHW tensor, zero-padded first where it is smaller."""
    h, w = x.shape[-2:]
    if crop > h or crop > w:
        pad_w, pad_h = max(crop - w, 0), max(crop - h, 0)
        x = F.pad(x, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2], value=0.0)
        h, w = x.shape[-2:]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return x[..., top:top + crop, left:left + crop]


def build_mix(mixup_alpha, cutmix_alpha, num_classes):
    """MixUp and/or CutMix for whole training batches (one of the two per batch when both are
    asked for), or None. The labels they return are soft: CrossEntropyLoss takes them as they are."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        return None
    from torchvision.transforms import v2 as T
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((T.MixUp, mixup_alpha), (T.CutMix, cutmix_alpha)) if alpha > 0]
    return T.RandomChoice(mixes) if len(mixes) > 1 else mixes[0]


def train_draft_size(img_size, min_scale):
    """The side a large JPEG may be decoded at for training (see my_dataset.load_rgb): the smallest
    crop RandomResizedCrop takes, min_scale of the area, still has img_size pixels across."""
    return round(img_size / math.sqrt(min_scale))


def eval_draft_size(resize):
    """The same for evaluation: twice the resize, so the resize still antialiases as with a full decode."""
    return 2 * resize


class EpochSampler(torch.utils.data.DistributedSampler):
    """This process's share of a shuffled epoch (all of it in a single process), each index paired
    with the seed of its augmentation (see MyDataSet). Order and seeds are a function of --seed,
    the epoch and the index alone, never of what ran before, so a resumed run, or one with other
    --workers, draws the same crops and flips as an uninterrupted one. With `weights` (one per
    image) the epoch is drawn with replacement in proportion to them, as WeightedRandomSampler
    does, then shared out among the processes."""

    def __init__(self, dataset, num_replicas, rank, shuffle=True, seed=0, weights=None):
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def indices(self):
        if self.weights is None:
            return super().__iter__()
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True,
                                  generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(drawn[self.rank:self.total_size:self.num_replicas].tolist())

    def __iter__(self):
        for index in self.indices():
            yield index, ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63


def balanced_weights(labels):
    """One weight per image, 1 / (images of its class): every class is drawn equally often."""
    counts = torch.bincount(torch.as_tensor(labels))
    return (1.0 / counts.double())[torch.as_tensor(labels)]


def make_loader(dataset, batch_size, train, workers, device, sampler=None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        # an incomplete last batch is left out of training: BatchNorm statistics of a few images are
        # noisy; the shuffle puts other images there in the next epoch
        drop_last=train and len(dataset) > batch_size, collate_fn=getattr(dataset, "collate_fn", MyDataSet.collate_fn),
        # worker seeds from a generator of the loader's own: the global RNG (dropout) stays untouched
        generator=torch.Generator().manual_seed(0), worker_init_fn=quiet_on_sigterm)


def quiet_on_sigterm(worker_id=None):
    """In a data loader worker: SIGTERM ends it at once and quietly. A signal sent to the whole
    process group (Slurm's scancel, kill -- -PGID) reaches the workers too; killed by it, they made
    PyTorch print a traceback while the main process was saving and saying how to resume."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


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
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name} is not a device to train or predict on: use auto, cpu, cuda, "
                         "cuda:1 or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but PyTorch sees no CUDA GPU here: use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
        if local_rank and device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def amp_dtype(mode, device):
    """The autocast dtype for --amp MODE ("auto", "bf16", "fp16", "off") on `device`, or None for fp32.
    auto is bf16 on GPUs that have it and fp32 elsewhere: on CPUs bf16 training measured slower
    than fp32 at 64-224 px, with AMX (Intel Xeon: 0.58x at 64 px, 0.95x at 224 px) and without."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
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


def on_rank0(fn):
    """fn() run by rank 0 alone and its result given to every process, or its UsageError raised
    in every process; just fn() in a single process."""
    if not is_distributed():
        return fn()
    box = [None]
    if rank() == 0:
        try:
            box[0] = (fn(), None)
        except UsageError as e:
            box[0] = (None, e)
    dist.broadcast_object_list(box, 0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


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
    """The loss or the weights became NaN or infinite: the run diverged."""


def check_finite(model, epoch):
    """NonFiniteLossError when a parameter or BatchNorm statistic is NaN or infinite."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(f"the weights became NaN or infinite in epoch {epoch} ({len(bad)} tensors, "
                                 f"e.g. {bad[0]})")


def to_device(images, labels, device, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return (images.to(device, non_blocking=True, memory_format=memory_format),
            labels.to(device, non_blocking=True))


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, scheduler, scaler, ema=None,
                    show=True, mix=None):
    """One pass over `loader`; returns (mean loss over all ranks, images/s). The scheduler steps
    once per optimizer step; from `args`: amp, grad_accum, clip_grad (0: off), channels_last.
    `mix` (MixUp or CutMix) blends each batch and turns its labels into soft targets."""
    model.train()
    for m in model.modules():  # frozen BatchNorm layers (--freeze-layers) keep their statistics too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad:
            m.eval()
    autocast, grad_accum = amp_dtype(args.amp, device), args.grad_accum
    loss_sum, seen = 0.0, 0  # plain floats: the loss is on the host already for the NaN check
    start = time.perf_counter()
    terminal = show and sys.stderr.isatty()  # a progress bar there; plain lines in a log file or a pipe
    next_line = start + args.log_interval
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=not terminal, leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    smallest = 1 if args.img_size > 32 else 2  # at 32 px BatchNorm's 1x1 maps need two images (check_args)
    for step, (images, labels) in enumerate(bar):
        if len(images) < smallest:  # unreadable files left less than BatchNorm needs
            continue
        images, labels = to_device(images, labels, device, args.channels_last)
        if mix is not None and len(images) > 1:
            images, labels = mix(images, labels)
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
        if terminal:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.1f}")
        elif show and time.perf_counter() >= next_line:
            now = time.perf_counter()
            next_line = now + args.log_interval
            left = (now - start) / (step + 1) * (len(loader) - step - 1)
            print(f"epoch {epoch}  step {step + 1}/{len(loader)}  loss {loss_sum / seen:.4f}  "
                  f"{seen / (now - start):.1f} img/s  epoch ends in {duration(left)}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(torch.tensor([loss_sum, seen], dtype=torch.float64, device=device))
    return sums[0].item() / max(sums[1].item(), 1), sums[1].item() / elapsed


def duration(seconds):
    """7s, 4m05s, 2h03m: the way a person reads a wait."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def learning_problem(confusion, classes):
    """Why the validation results say that nothing has been learned (yet), or None: one class
    takes (nearly) all predictions, or top-1 is no better than always answering the largest class."""
    total = confusion.sum().item()
    if not total:
        return None
    predicted = confusion.sum(0)
    top = predicted.argmax().item()
    if predicted[top].item() >= 0.95 * total:
        return f"{predicted[top].item()} of {total} validation images are predicted as '{printable(classes[top])}'"
    largest = confusion.sum(1).max().item() / total
    accuracy = confusion.trace().item() / total
    if accuracy <= largest + 0.02:
        return f"validation top-1 {accuracy:.2f} is no better than always answering the largest class ({largest:.2f})"
    return None


@torch.inference_mode()
def precise_bn(model, loader, device, channels_last=False, show=True):
    """Re-estimate every BatchNorm's running statistics for the weights as they are now: a plain
    average over the batches of `loader` (training images as validation sees them), in place of
    the moving average that lags behind weights changing fast. The rest of the model stays in eval
    mode (no dropout, no stochastic depth); under torchrun the ranks' statistics are averaged.
    Frozen layers (--freeze-layers) keep theirs, as in training."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and (m.weight is None or m.weight.requires_grad)]
    if not norms or len(loader) == 0:
        return
    was_training = model.training
    model.eval()
    momenta = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]  # training's count stays
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
        m.train()
    for images, _ in tqdm(loader, desc="BatchNorm", disable=None if show else True, leave=False, dynamic_ncols=True):
        if len(images) > 1:
            model(to_device(images, images, device, channels_last)[0])
    for m, (momentum, tracked) in zip(norms, momenta):
        m.momentum = momentum
        m.num_batches_tracked.copy_(tracked)
        for buffer in (m.running_mean, m.running_var):
            all_reduce_sum(buffer).div_(world_size())
    model.train(was_training)


@torch.inference_mode()
def evaluate(model, loader, device, num_classes, channels_last=False, show=True, tta=False):
    """Loss, top-1, top-5 (top-k capped at the class count) and the confusion matrix over every
    image in `loader`, summed over all ranks: each rank must see a disjoint part of the data.
    Always in fp32, as predict.py runs by default, so the accuracy reported is the one users get.
    tta: the mean of the probabilities of each image and its mirror image. When the loader gives
    dataset indices too (IndexedSubset), "predictions" holds every image's (index, predicted class,
    its probability, the true class's probability), gathered from all ranks, in index order."""
    model.eval()
    n = num_classes
    confusion = torch.zeros(n * n, dtype=torch.int64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-5 hits
    records = []
    for images, labels, *index in tqdm(loader, desc="validate", disable=None if show else True, leave=False,
                                       dynamic_ncols=True):
        if len(images) == 0:
            continue
        images, labels = to_device(images, labels, device, channels_last)
        log_probs = mirror_averaged(model, images).log() if tta else model(images).float().log_softmax(1)
        sums[0] += torch.nn.functional.nll_loss(log_probs, labels, reduction="sum")
        sums[1] += (log_probs.topk(min(5, n)).indices == labels[:, None]).any(1).sum()
        confusion += torch.bincount(labels * n + log_probs.argmax(1), minlength=n * n)
        if index:
            probs = log_probs.exp()
            top = probs.max(1)
            records.append(torch.stack([index[0].double(), top.indices.cpu().double(), top.values.cpu().double(),
                                        probs.gather(1, labels[:, None])[:, 0].cpu().double()], 1))
    all_reduce_sum(confusion)
    all_reduce_sum(sums)
    confusion = confusion.view(n, n).cpu()
    total = max(confusion.sum().item(), 1)
    result = {"val_loss": sums[0].item() / total, "val_top1": confusion.trace().item() / total,
              "val_top5": sums[1].item() / total, "confusion": confusion}
    if records or is_distributed() and isinstance(loader.dataset, IndexedSubset):
        mine = torch.cat(records) if records else torch.zeros(0, 4, dtype=torch.float64)
        table = torch.cat(gather_objects(mine))
        table = table[table[:, 0].argsort()]
        result["predictions"] = {"index": table[:, 0].long(), "predicted": table[:, 1].long(),
                                 "prob": table[:, 2].float(), "prob_true": table[:, 3].float()}
    return result


def mirror_averaged(model, images):
    """The mean of the softmax of the images and of their mirror images (test-time augmentation)."""
    return (model(images).float().softmax(1) + model(images.flip(3)).float().softmax(1)) / 2


class IndexedSubset(torch.utils.data.Dataset):
    """The samples of `dataset` at `indices`, each with its index there: (image, label, index)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        sample = self.dataset[self.indices[i]]
        return None if sample is None else (*sample, self.indices[i])

    @staticmethod
    def collate_fn(batch):
        batch = [sample for sample in batch if sample is not None]
        images, labels = MyDataSet.collate_fn([sample[:2] for sample in batch])
        return images, labels, torch.as_tensor([sample[2] for sample in batch], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Files: metrics, per-class figures, plots; all written whole (checkpoint.atomic_write)
# ---------------------------------------------------------------------------------------------

def atomic_write_text(path, text):
    """UTF-8; file names that are not UTF-8 keep their bytes as on disk (surrogateescape)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def quiet_warnings():
    """Warnings as this repo's one-line messages, never with a line of library code under them.
    Pillow's decompression-bomb warning becomes an error, so the image is named and left out like
    any unreadable one; Pillow's notes on conversions that load_rgb makes anyway, and PyTorch's on
    a scheduler step that a skipped fp16 step causes, are dropped. Called by the scripts at start."""
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    for message in ("Palette images with Transparency", "(Possibly )?[Cc]orrupt EXIF", "Truncated File Read",
                    "Image appears to be a malformed MPO", "Metadata Warning",
                    r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                    "This DataLoader will create"):  # --workers is capped at the CPU count instead
        warnings.filterwarnings("ignore", message=message)
    warnings.showwarning = lambda message, category, *rest: print(f"warning: {message}", file=sys.stderr)


def usable_workers(requested):
    """--workers, but no more than the CPUs this process may use (more only slows loading down)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested > cpus:
        print0(f"note: --workers {requested} is more than the {cpus} CPUs here; using {cpus}", file=sys.stderr)
    return min(requested, cpus)


def printable(name):
    """A file or class name as text a plot can draw: bytes that are not UTF-8 as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def speak_any_file_name():
    """Let print() show any file name: one that is not UTF-8 is printed with backslash escapes
    instead of raising UnicodeEncodeError. Called by the scripts at start."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


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


def recall_line(confusion, classes, most=10):
    """'recall  cat 0.95  dog 0.60 ...': every class's, or the `most` lowest where there are more."""
    rows = per_class_rows(confusion, classes)
    if len(rows) > most:
        rows = sorted(rows, key=lambda r: r["recall"])[:most]
    label = "recall" if len(rows) == len(classes) else f"lowest recall ({len(rows)} of {len(classes)} classes)"
    return f"{label}  " + "  ".join(f"{printable(r['class'])} {r['recall']:.2f}" for r in rows)


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


def plot_curves(history, path, num_classes):
    """Loss, accuracy and learning rate per epoch, the best epoch marked; top-5 only where it can
    be wrong (more than 5 classes)."""
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    best = max(history, key=lambda r: r["val_top1"])  # the first of equals, as best.pth keeps it
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.9))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [r["val_top1"] for r in history], "o-", label="top-1")
    if num_classes > 5:
        ax_acc.plot(epochs, [r["val_top5"] for r in history], "o-", label="top-5")
    ax_acc.plot([best["epoch"]], [best["val_top1"]], "*", color="crimson", markersize=14,
                label=f"best: epoch {best['epoch']}, {best['val_top1']:.3f}")
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylim=(0, 1.02))
    ax_lr.plot(epochs, [r["lr"] for r in history], "o-")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.axvline(best["epoch"], color="crimson", alpha=0.25, linestyle="--")
    for ax in (ax_loss, ax_acc):  # below the axes, never over the curves
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False, fontsize=8)
    save_figure(fig, path)


def write_mistakes(folder, predictions, split, title, limit=48):
    """predictions.csv (every validation image: path, true and predicted class, the probability of
    each) and mistakes.png (the `limit` most confident mistakes) in `folder`; a line that says so."""
    classes, index = split.classes, predictions["index"].tolist()
    paths = [split.val_images[i] for i in index]
    true = [split.val_labels[i] for i in index]
    predicted, prob, prob_true = (predictions[k].tolist() for k in ("predicted", "prob", "prob_true"))
    rows = ["path,true,predicted,prob,prob_true,correct"]
    rows += [",".join([csv_field(path), csv_field(classes[t]), csv_field(classes[p]), f"{q:.4f}", f"{qt:.4f}",
                       str(int(t == p))]) for path, t, p, q, qt in zip(paths, true, predicted, prob, prob_true)]
    atomic_write_text(os.path.join(folder, "predictions.csv"), "\n".join(rows) + "\n")
    wrong = sorted((i for i in range(len(paths)) if true[i] != predicted[i]), key=lambda i: -prob[i])
    if not wrong:
        return f"no mistakes: all {len(paths)} validation images right (predictions.csv lists them)"
    tiles = [(paths[i], f"{printable(classes[true[i]])[:14]} -> {printable(classes[predicted[i]])[:14]} "
                        f"({prob[i]:.2f})") for i in wrong[:limit]]
    plot_tiles(tiles, os.path.join(folder, "mistakes.png"),
               f"{title}: {len(wrong)} of {len(paths)} wrong, most confident first (true -> predicted (prob))")
    shown = f"the {len(tiles)} most confident of {len(wrong)}" if len(tiles) < len(wrong) else f"all {len(wrong)}"
    return (f"mistakes.png: {shown} wrong validation images; predictions.csv: all {len(paths)}, "
            "with the probability of the true class")


def plot_tiles(tiles, path, title=None):
    """A grid of (image path, caption) tiles, 8 to a row, each image shown whole with its file name."""
    plt = pyplot()
    cols = min(8, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, tiles):
        try:
            img = load_rgb(image, 256)
            img.thumbnail((160, 160))
            ax.imshow(img)
        except Exception:  # gone or broken since it was evaluated
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{caption}\n{printable(os.path.basename(image))[:24]}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
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
    ax.set_xticklabels([printable(c) for c in classes], rotation=90 if n > 6 else 0)
    ax.set_yticklabels([printable(c) for c in classes])
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
    ax.set_xticklabels([printable(c) for c in split.classes], rotation=90 if n > 8 else 0)
    ax.set(xlabel="class", ylabel="images", title="images per class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the bars, not on them
    save_figure(fig, path)
