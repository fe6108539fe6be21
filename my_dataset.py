"""The image dataset: a list of files and labels, each file decoded to an RGB PIL image.

    from my_dataset import MyDataSet
    ds = MyDataSet(["data/digits/3/0003.png"], [3], transform=None)
    image, label = ds[0]

Every mode Pillow opens becomes RGB the way a person would see it: grey and 16-bit images are
scaled, not clipped; transparent pixels are put on white; EXIF rotation is applied. A file that
fails to decode is reported by path and left out of its batch (see `collate_fn`), never a crash.
"""
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset


def load_rgb(path, draft_size=None):
    """Open `path` as an RGB image. `draft_size` lets a large JPEG decode at 1/2, 1/4 or 1/8 of
    its size, never smaller than draft_size on either side, which is far faster than a full decode."""
    with Image.open(path) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img = ImageOps.exif_transpose(img)  # also loads the pixels
    return to_rgb(img)


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(img):
    if img.mode in ("I", "F", *SIXTEEN_BIT):
        # 16-bit, 32-bit and float images: scale to 0-255 instead of letting convert() clip them
        pixels = np.asarray(img, dtype=np.float32)
        top = pixels.max(initial=0.0)
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


class MyDataSet(Dataset):
    def __init__(self, images_path, images_class, transform=None, draft_size=None):
        self.images_path = list(images_path)
        self.images_class = list(images_class)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self):
        return len(self.images_path)

    def __getitem__(self, item):
        path = self.images_path[item]
        try:
            img = load_rgb(path, self.draft_size)
        except Exception as e:  # truncated or corrupt data that the start-up scan could not see
            warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.images_class[item]

    @staticmethod
    def collate_fn(batch):
        """Stack a batch, leaving out the images that could not be decoded (None)."""
        batch = [sample for sample in batch if sample is not None]
        if not batch:
            return torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long)
        images, labels = zip(*batch)
        return torch.stack(images), torch.as_tensor(labels)
