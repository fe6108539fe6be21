"""The image dataset: a list of files and labels, each file decoded to an RGB PIL image.

    from my_dataset import MyDataSet
    ds = MyDataSet(["data/digits/3/0003.png"], [3], transform=None)
    image, label = ds[0]

Every mode Pillow opens becomes RGB the way a person would see it: grey and 16-bit images are
scaled, not clipped; transparent pixels are put on white; EXIF rotation is applied. A file that
fails to decode is reported by path and left out of its batch (see `collate_fn`), never a crash.
Below the dataset: the sampler that makes each epoch's order and augmentation a function of the
seed alone (so a resumed run draws what an uninterrupted one would), and the loaders.
"""
import contextlib
import sys
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from cli import printable
from runtime import init_loader_worker


# Longer side over shorter side. Evaluation resizes the shorter side to the model's size, so a
# 20000x1 file (101 bytes as a PNG) would become a 5-gigapixel image; no photo is this thin.
MAX_ASPECT = 50


def shape_problem(width, height):
    """Why an image of this size cannot be used, or None."""
    if width == 0 or height == 0:
        return "image has no pixels"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return (f"{width}x{height} pixels: an aspect ratio over {MAX_ASPECT}:1 is not a picture this model can "
                "use (crop it first)")
    return None


def load_rgb(path, draft_size=None, formats=None):
    """Open `path` (a file name or a file object) as an RGB image, read by the Pillow plug-ins of
    `formats` alone when given (e.g. ["JPEG", "PNG"]). `draft_size` lets a large JPEG decode at 1/2, 1/4 or 1/8 of
    its size, never smaller than draft_size on either side, which is far faster than a full decode.
    Sizes that shape_problem refuses raise ValueError before any pixel is decoded."""
    with Image.open(path, formats=formats) as img:
        if problem := shape_problem(*img.size):
            raise ValueError(problem)
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img = ImageOps.exif_transpose(img)  # also loads the pixels
    return to_rgb(img)


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(img):
    if img.mode in ("I", "F", *SIXTEEN_BIT):
        # 16-bit, 32-bit and float images: scale to 0-255 instead of letting convert() clip them
        pixels = np.asarray(img, dtype=np.float32)
        finite = np.isfinite(pixels)
        top = pixels.max(initial=0.0, where=finite)  # a NaN (no data) must not set the scale of the rest
        pixels = np.where(finite, pixels, 0.0) if not finite.all() else pixels
        if img.mode in SIXTEEN_BIT:
            pixels = pixels / 257.0  # the full 16-bit range, as an image viewer shows it
        elif img.mode == "F" and top <= 1.0:
            pixels = pixels * 255.0
        elif top > 255:
            pixels = pixels / 257.0 if top <= 65535 else pixels * (255.0 / top)
        img = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # also PNG colour keys
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


@contextlib.contextmanager
def seeded(seed):
    """torch's CPU RNG seeded with `seed` inside the block (nothing changes for None), and put back
    as it was after it, so the caller's random stream goes on undisturbed. (torch.random.fork_rng
    does the same for every device, 60x slower: it would cost more than decoding a small image.)"""
    if seed is None:
        yield
        return
    rng = torch.default_generator
    state = rng.get_state()
    rng.manual_seed(seed)
    try:
        yield
    finally:
        rng.set_state(state)


class PackedPaths:
    """A read-only list of file paths kept as one block of bytes and a table of offsets: two
    objects however many paths. A list of a million str objects costs about 2x the memory, and
    each DataLoader worker that reads it ends up with a copy of its own (reading a Python object
    writes its reference count, and that copies the page)."""

    def __init__(self, paths):
        paths = list(paths)
        # joined by NUL, the one byte no file name can hold; where each path ends is then one search
        self.data = "\0".join(paths).encode("utf-8", "surrogateescape")
        ends = np.flatnonzero(np.frombuffer(self.data, dtype=np.uint8) == 0)
        self.ends = np.append(ends, len(self.data)) if paths else ends

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        end = int(self.ends[i])
        start = int(self.ends[i - 1]) + 1 if i % len(self) else 0
        return self.data[start:end].decode("utf-8", "surrogateescape")


def warned_flags(slots=1 << 20):
    """One flag per hash of a file name, in shared memory: the files named unreadable already, by
    any dataset given the same flags and by any of their loader workers (each of which has its own
    copy of everything else). A file is then named once, not once per worker, loader and epoch.
    Two unreadable files that share a slot (one in a million) are named once between them."""
    return torch.zeros(slots, dtype=torch.uint8).share_memory_()


class MyDataSet(Dataset):
    def __init__(self, images_path, images_class, transform=None, draft_size=None, warned=None):
        self.images_path = PackedPaths(images_path)
        self.images_class = torch.as_tensor(list(images_class), dtype=torch.int64)
        self.transform = transform
        self.draft_size = draft_size
        self.warned = warned_flags() if warned is None else warned

    def __len__(self):
        return len(self.images_path)

    def __getitem__(self, item):
        """(image, label), or None for a file that cannot be decoded. `item` is an index, or
        (index, seed) from EpochSampler: the random transform then draws from that seed
        alone, so the augmentation of an image does not depend on which worker loads it."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        path = self.images_path[index]
        try:
            img = load_rgb(path, self.draft_size)
        except Exception as e:  # broken, truncated or gone since the folder was listed
            slot = zlib.crc32(path.encode("utf-8", "surrogateescape")) % len(self.warned)
            if not self.warned[slot]:
                self.warned[slot] = 1
                print(printable(f"warning: skipping unreadable image {path}: {e}"), file=sys.stderr)
            return None
        if self.transform is not None:
            with seeded(seed):
                img = self.transform(img)
        return img, int(self.images_class[index])

    @staticmethod
    def collate_fn(batch):
        """Stack a batch, leaving out the images that could not be decoded (None)."""
        batch = [sample for sample in batch if sample is not None]
        if not batch:
            return torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long)
        images, labels = zip(*batch)
        return torch.stack(images), torch.as_tensor(labels)

# ---------------------------------------------------------------------------------------------
# Samplers and loaders
# ---------------------------------------------------------------------------------------------


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


def make_loader(dataset, batch_size, train, workers, device, sampler=None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        # an incomplete last batch is left out of training: BatchNorm statistics of a few images are
        # noisy; the shuffle puts other images there in the next epoch
        drop_last=train and len(dataset) > batch_size, collate_fn=getattr(dataset, "collate_fn", MyDataSet.collate_fn),
        # worker seeds from a generator of the loader's own: the global RNG (dropout) stays untouched
        generator=torch.Generator().manual_seed(0), worker_init_fn=init_loader_worker)
