"""Image transforms: training augmentation (torchvision's v2 transforms), the evaluation transform
that validation and predict.py share (plain PyTorch, equal to torchvision's to the bit), MixUp and
CutMix, and the sizes at which a large JPEG may be decoded.

    from transforms import build_transform
    train_tf = build_transform(VARIANTS["b0"], 224, train=True)
    eval_tf = build_transform(VARIANTS["b0"], 224, train=False)   # resize 256, centre crop 224
"""
import math
import platform

import numpy as np
import torch
import torch.nn.functional as F


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
