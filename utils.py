"""As in the tutorial: finding the images and splitting them into training and validation sets,
and the training and evaluation loops (with precise BatchNorm statistics)."""
import array
import contextlib
import math
import multiprocessing
import os
import random
import re
import sys
import time
from collections import namedtuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cli import printable, progress_bars
from errors import DataError, NonFiniteLossError
from my_dataset import IndexedSubset, shape_problem
from outputs import atomic_write_text
from runtime import all_reduce_sum, amp_dtype, gather_objects, is_distributed, sum_dtype, world_size


# ---------------------------------------------------------------------------------------------
# Finding and splitting the images
# ---------------------------------------------------------------------------------------------

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

VAL_FOLDERS = ("val", "valid", "validation")


def list_images(folder, rejected=None, foreign=None, inodes=None):
    """Image files under `folder`, recursively and following links, in a stable order (a folder's
    files by name, then its sub-folders by name); hidden files and other types are ignored.

    Each real directory is visited once, so a link back into the tree (`self -> .`) cannot repeat
    or loop. `foreign(real_path)` may say why a link's target is not this folder's to take (it
    belongs to another class, or lies above the data); such a link is not followed. Anything
    named like an image that is not a regular file (a FIFO, a socket, a broken link) is never
    opened. Both go to `rejected` as (path, why). With `inodes` (an array of "Q"), each file's inode
    number is appended to it, in the order of the files: free on Linux, where the directory entry
    holds it (for a link, the stat that found the file is reused).
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
                    if inodes is not None:
                        inodes.append(e.stat().st_ino if e.is_symlink() else e.inode())
                else:
                    rejected.append((e.path, "not a regular file (a FIFO, socket, device or broken link); "
                                             "not opened"))
        for e in entries:
            if e.is_dir():
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
    the data, a link and the file itself, or hard links) counts once, for the first path, and the
    others are named. Image files beside the class folders are counted and left out, with a word."""
    if not os.path.exists(root):
        where = " (data/README.md says where to get it)" if os.path.basename(os.path.normpath(root)) == "flower_photos" \
            else ""
        raise DataError(f"data path {root} does not exist{where}: pass --data-path pointing at a folder "
                        "with one sub-folder of images per class")
    if not os.path.isdir(root):
        raise DataError(f"data path {root} is a file, not a folder: pass the folder that holds one "
                        "sub-folder of images per class")
    with os.scandir(root) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    names = sorted(e.name for e in entries if e.is_dir())
    loose = sum(1 for e in entries if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file())
    if loose:
        print(f"warning: {loose} image file(s) directly in {printable(root)} are not in a class folder; left out",
              file=sys.stderr)
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

    broken, inodes = [], array.array("Q")
    listed = {name: list_images(os.path.join(root, name), broken, foreign_to(name), inodes) for name in names}
    twice = same_inode_number(inodes)
    if len(twice):  # a file reached a second time (links, hard links): counted once, for its first path
        paths = [path for paths in listed.values() for path in paths]
        first_path, dropped = {}, set()
        for i in twice.tolist():  # in listing order; only these files cost a stat
            info = os.stat(paths[i])
            first = first_path.setdefault((info.st_dev, info.st_ino), paths[i])
            if first != paths[i]:
                broken.append((paths[i], f"the same file as {first}; counted once"))
                dropped.add(paths[i])
        listed = {name: [p for p in paths if p not in dropped] for name, paths in listed.items()}
    for name, paths in listed.items():
        if not paths:
            print(f"warning: class folder {printable(os.path.join(root, name))} has no images; skipped",
                  file=sys.stderr)
    return {name: paths for name, paths in listed.items() if paths}, broken


def same_inode_number(inodes):
    """The positions, in order, of the files whose inode number some other file has too: the only
    ones that can be the same file. A sort of the numbers (13 ms for a million files on a 2-core
    CPU) instead of a stat per file."""
    numbers = np.frombuffer(inodes, dtype=np.uint64)
    ordered = np.sort(numbers)
    if not (ordered[1:] == ordered[:-1]).any():  # the usual case: no file is there twice
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(numbers)
    same = np.flatnonzero(numbers[order][1:] == numbers[order][:-1])
    return np.unique(np.concatenate([order[same], order[same + 1]]))


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


def reuse_split(now, root, train_images, train_labels, val_images, val_labels):
    """The split a resumed run started with (its lists, from last.pth), whatever `root` holds now
    (`now`, the Split that read_split_data finds there): a file added since is not used, and one
    gone since keeps its place, counted here and named by the loader, which skips it. No image
    trained on moves into validation, and indices into the validation list (predictions.csv) keep
    their files."""
    if max(train_labels + val_labels, default=0) >= len(now.classes):
        raise DataError(f"{root} has {len(now.classes)} classes, fewer than the run was trained on; resume with "
                        "the same data or start a new run")
    usable, stored = set(now.train_images) | set(now.val_images), set(train_images) | set(val_images)
    gone = len(stored - usable - {p for p, _ in now.broken})  # the broken ones are named already
    added = len(usable - stored)
    if gone:
        print(f"warning: {gone} file(s) the run was started with are gone from {printable(root)}; the run goes "
              "on without them (each is named when it is met)", file=sys.stderr)
    if added:
        print(f"note: {added} image file(s) added to {printable(root)} since the run started are not used: a "
              "resumed run keeps its training and validation files (a new run would use them)", file=sys.stderr)
    return Split(train_images, train_labels, val_images, val_labels, now.classes, now.broken, now.unchecked)


def drop_files(split, bad, folders):
    """The split without the files in `bad`; a class left with no files at all is skipped."""
    kept = {}
    for c, (tr, va) in split.items():
        tr, va = [p for p in tr if p not in bad], [p for p in va if p not in bad]
        if tr or va:
            kept[c] = (tr, va)
        else:
            where = " and ".join(os.path.join(folder, c) for folder in folders)
            print(f"warning: class folder {printable(where)} has no usable images; skipped", file=sys.stderr)
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


NAMED_ONE_BY_ONE = 10  # more left-out files than this: a count per reason and the first few of each
LEFT_OUT_LIST = "left_out.txt"  # the whole list, in the run folder (train.py writes it)


def report_broken(broken):
    """Name the files left out on stderr: each with its reason, or past NAMED_ONE_BY_ONE a line per
    reason with its count and first 3 paths (900 hard links printed 908 lines before training)."""
    if not broken:
        return
    if len(broken) <= NAMED_ONE_BY_ONE:
        lines = "\n".join(f"  {printable(path)}: {printable(reason)}" for path, reason in broken)
    else:
        kinds = {}
        for path, reason in broken:
            kinds.setdefault(re.sub(r"^the same file as .*; counted once$", "the same file as another; counted once",
                                    reason), []).append(path)
        lines = "\n".join(f"  {len(paths)} x {printable(kind)}: {', '.join(printable(p) for p in paths[:3])}"
                          + (", ..." if len(paths) > 3 else "") for kind, paths in kinds.items())
        lines += f"\n  the whole list: {LEFT_OUT_LIST} in the run folder"
    print(f"warning: {len(broken)} file(s) could not be used and are left out:\n{lines}", file=sys.stderr)


def write_left_out(path, broken):
    """The whole list of the files left out, a line each: path, a tab, the reason."""
    text = "".join(f"{file}\t{reason}\n" for file, reason in broken)
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Training and evaluation loops
# ---------------------------------------------------------------------------------------------


CHECK_EVERY = 50  # on a GPU, the steps between two reads of the loss (the NaN check)


def check_finite(model, epoch):
    """NonFiniteLossError when a parameter or BatchNorm statistic is NaN or infinite. One read of
    the device for all tensors (one each would make a GPU wait 360 times for B0)."""
    named = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu() if named else torch.ones(0, dtype=torch.bool)
    bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
    if bad:
        raise NonFiniteLossError(f"the weights became NaN or infinite in epoch {epoch} ({len(bad)} tensors, "
                                 f"e.g. {bad[0]})")


def to_device(images, labels, device, channels_last, normalize=None):
    """A batch on `device`; `normalize` (transforms.Normalize) turns uint8 images into floats there."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images if normalize is None else normalize(images), labels.to(device, non_blocking=True)


# what train_one_epoch returns: the mean loss over all ranks, images per second, the seconds this
# process spent waiting for the loader's next batch, and their share of the epoch's time (0.3: the
# GPU or CPU waited for data 30 % of the time; more --workers, or a cheaper augmentation, would help)
EpochFigures = namedtuple("EpochFigures", "loss images_per_second data_time data_wait")


def timed(iterable, waited):
    """The items of `iterable`; the seconds spent waiting for each are added to waited[0]."""
    it = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - start
        yield item


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, scheduler, scaler, ema=None,
                    show=True, mix=None, normalize=None):
    """One pass over `loader`; returns its EpochFigures. The scheduler steps once per optimizer
    step; from `args`: amp, grad_accum, clip_grad (0: off), channels_last. `normalize`
    (transforms.Normalize) turns the loader's uint8 images into floats on the device; `mix`
    (MixUp or CutMix) then blends each batch and turns its labels into soft targets."""
    model.train()
    for m in model.modules():  # frozen BatchNorm layers (--freeze-layers) keep their statistics too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad:
            m.eval()
    autocast, grad_accum = amp_dtype(args.amp, device), args.grad_accum
    # The loss is summed where it is computed. Reading it (.item()) makes the host wait for the
    # device to finish: free on a CPU, where every step is checked for NaN; on a GPU it would
    # stall every step, so the sum is read, and checked, every CHECK_EVERY steps and for the log.
    check_every = 1 if device.type == "cpu" else CHECK_EVERY
    loss_sum, seen, checked = torch.zeros((), dtype=sum_dtype(device), device=device), 0, 0
    start = time.perf_counter()
    terminal = show and progress_bars()  # a progress bar there; plain lines in a log file or a pipe
    next_line = start + args.log_interval
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=not terminal, leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    smallest = 1 if args.img_size > 32 else 2  # at 32 px BatchNorm's 1x1 maps need two images (check_args)
    waited = [0.0]
    for step, (images, labels) in enumerate(timed(bar, waited)):
        if len(images) < smallest:  # unreadable files left less than BatchNorm needs
            continue
        images, labels = to_device(images, labels, device, args.channels_last, normalize)
        if mix is not None and len(images) > 1:
            images, labels = mix(images, labels)
        update = (step + 1) % grad_accum == 0 or step + 1 == len(loader)
        # DDP: only the last micro-batch of an accumulation step all-reduces gradients
        sync = model.no_sync() if hasattr(model, "no_sync") and not update else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = criterion(model(images), labels)
            scaler.scale(loss / grad_accum).backward()
        loss_sum += loss.detach().to(loss_sum.dtype) * len(images)
        seen += len(images)
        if (step + 1) % check_every == 0 or step + 1 == len(loader):
            total = loss_sum.item()
            if not math.isfinite(total):
                where = f"step {step}" if check_every == 1 else f"steps {checked}-{step}"
                raise NonFiniteLossError(f"the loss became {total} in epoch {epoch}, {where}")
            checked = step + 1
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
        if terminal and checked == step + 1:
            bar.set_postfix(loss=f"{total / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.1f}")
        elif show and not terminal and time.perf_counter() >= next_line:
            now = time.perf_counter()
            next_line = now + args.log_interval
            left = (now - start) / (step + 1) * (len(loader) - step - 1)
            print(f"epoch {epoch}  step {step + 1}/{len(loader)}  loss {loss_sum.item() / seen:.4f}  "
                  f"{seen / (now - start):.1f} img/s  epoch ends in {duration(left)}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(torch.stack([loss_sum, torch.tensor(seen, dtype=loss_sum.dtype, device=device)]))
    return EpochFigures(sums[0].item() / max(sums[1].item(), 1), sums[1].item() / elapsed, waited[0],
                        waited[0] / elapsed)


def duration(seconds):
    """7s, 4m05s, 2h03m: the way a person reads a wait."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@torch.inference_mode()
def precise_bn(model, loader, device, channels_last=False, show=True, normalize=None):
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
    for images, labels in tqdm(loader, desc="re-estimating BatchNorm statistics",
                               disable=not (show and progress_bars()), leave=False, dynamic_ncols=True):
        if len(images) > 1:
            model(to_device(images, labels, device, channels_last, normalize)[0])
    for m, (momentum, tracked) in zip(norms, momenta):
        m.momentum = momentum
        m.num_batches_tracked.copy_(tracked)
        for buffer in (m.running_mean, m.running_var):
            all_reduce_sum(buffer).div_(world_size())
    model.train(was_training)


@torch.inference_mode()
def evaluate(model, loader, device, num_classes, channels_last=False, show=True, tta=False, normalize=None):
    """Loss, top-1, top-5 (top-k capped at the class count) and the confusion matrix over every
    image in `loader`, summed over all ranks: each rank must see a disjoint part of the data.
    Always in fp32, as predict.py runs by default, so the accuracy reported is the one users get.
    tta: the mean of the probabilities of each image and its mirror image. When the loader gives
    dataset indices too (IndexedSubset), "predictions" holds every image's (index, predicted class,
    its probability, the true class's probability), gathered from all ranks, in index order.
    `normalize` (transforms.Normalize) turns the loader's uint8 images into floats on the device."""
    model.eval()
    n = num_classes
    confusion = torch.zeros(n * n, dtype=torch.int64, device=device)
    sums = torch.zeros(2, dtype=sum_dtype(device), device=device)  # loss sum, top-5 hits
    records = []
    for images, labels, *index in tqdm(loader, desc="validate", disable=not (show and progress_bars()), leave=False,
                                       dynamic_ncols=True):
        if len(images) == 0:
            continue
        images, labels = to_device(images, labels, device, channels_last, normalize)
        log_probs = mirror_averaged(model, images).log() if tta else model(images).float().log_softmax(1)
        sums[0] += torch.nn.functional.nll_loss(log_probs, labels, reduction="sum")
        sums[1] += (log_probs.topk(min(5, n)).indices == labels[:, None]).any(1).sum()
        confusion += torch.bincount(labels * n + log_probs.argmax(1), minlength=n * n)
        if index:  # kept where they are computed, and read from there once, after the last batch
            probs = log_probs.exp()
            top = probs.max(1)
            records.append((index[0], top.indices, top.values, probs.gather(1, labels[:, None])[:, 0]))
    all_reduce_sum(confusion)
    all_reduce_sum(sums)
    confusion = confusion.view(n, n).cpu()
    total = max(confusion.sum().item(), 1)
    result = {"val_loss": sums[0].item() / total, "val_top1": confusion.trace().item() / total,
              "val_top5": sums[1].item() / total, "confusion": confusion}
    if records or is_distributed() and isinstance(loader.dataset, IndexedSubset):
        columns = [torch.cat(column).cpu().double() for column in zip(*records)]
        mine = torch.stack(columns, 1) if records else torch.zeros(0, 4, dtype=torch.float64)
        table = torch.cat(gather_objects(mine))
        table = table[table[:, 0].argsort()]
        result["predictions"] = {"index": table[:, 0].long(), "predicted": table[:, 1].long(),
                                 "prob": table[:, 2].float(), "prob_true": table[:, 3].float()}
    return result


def mirror_averaged(model, images):
    """The mean of the softmax of the images and of their mirror images (test-time augmentation)."""
    return (model(images).float().softmax(1) + model(images.flip(3)).float().softmax(1)) / 2
