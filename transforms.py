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
    """Train: TrainCrop (random resized crop and flip), an optional policy of AUTO_AUGMENT
    (TrivialAugmentWide, RandAugment, AugMix or AutoAugment's ImageNet policy) and optional random
    erasing, all on the uint8 pixels; Normalize then turns the batch into floats on the device.
    Eval: EvalTransform, resize then centre crop with the variant's crop ratio (its normalize makes floats)."""
    if not train:
        return EvalTransform(*(eval_sizes or variant.eval_sizes(img_size)), variant.interpolation,
                             variant.mean, variant.std)
    crop = TrainCrop(img_size, scale, variant.interpolation, hflip)
    if not auto_augment and not random_erase:
        return crop
    from torchvision.transforms import InterpolationMode  # only here: torchvision takes a second to import
    from torchvision.transforms import v2 as T
    bilinear = InterpolationMode.BILINEAR
    policy = {None: lambda: [], "ta_wide": lambda: [T.TrivialAugmentWide(interpolation=bilinear)],
              "ra": lambda: [T.RandAugment(magnitude=ra_magnitude, interpolation=bilinear)],
              "augmix": lambda: [T.AugMix(interpolation=bilinear)],
              "imagenet": lambda: [T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, bilinear)]}[auto_augment]()
    # the erased rectangle takes the mean colour, which Normalize turns into 0
    erase = [T.RandomErasing(random_erase, value=[round(255 * m) for m in variant.mean])] if random_erase else []
    return T.Compose([crop, T.ToImage(), *policy, *erase, T.ToPureTensor()])


class TrainCrop:
    """PIL image -> uint8 CHW tensor: torchvision's RandomResizedCrop (its draws of area and aspect
    ratio, its fallback to the centre), resized by PyTorch's uint8 kernels with antialiasing as
    EvalTransform resizes, then a random horizontal flip. Four times less to send from a loader
    worker than floats, and the resize costs about a third of PIL's (0.3 ms against 1.0-1.5 ms a
    500x375 photo, docs/performance.md): one core feeds more images."""

    def __init__(self, size, scale, interpolation, hflip=True, ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), ratio
        self.interpolation, self.hflip = interpolation, hflip

    def __call__(self, img):
        from torchvision.transforms import RandomResizedCrop  # the same draws as torchvision's
        x = pixels(img)
        top, left, h, w = RandomResizedCrop.get_params(x, self.scale, self.ratio)
        x = resize_uint8(x[:, top:top + h, left:left + w], (self.size, self.size), self.interpolation)
        if self.hflip and torch.rand(1) < 0.5:
            x = x.flip(-1)
        return x


class Normalize:
    """A batch of uint8 images -> normalised floats, where the batch is (the device): the end of
    the training pipeline, the same arithmetic as EvalTransform's per image."""

    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x):
        if x.dtype != torch.uint8:
            return x
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return x.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)


def pixels(img):
    """A PIL RGB image as a uint8 CHW tensor (channels-last in memory, as the pixels are stored)."""
    return torch.as_tensor(np.array(img, copy=True)).view(img.height, img.width, -1).permute(2, 0, 1)


def resize_uint8(x, size, interpolation):
    """CHW uint8 `x` resized to `size` (h, w) with antialiasing, uint8 in and out where PyTorch has
    the kernel (bicubic; bilinear with AVX2 or on ARM), else through float32 with the same rounding."""
    channels, h, w = x.shape
    if tuple(size) == (h, w):
        return x
    x = x.reshape(1, channels, h, w)
    if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != x.stride(0):
        x = x.as_strided(x.shape, (x.numel(),) + x.stride()[1:])  # so that the output is channels-last too
    native = interpolation == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
        or platform.machine() in ("aarch64", "arm64")
    y = F.interpolate(x if native else x.float(), size=size, mode=interpolation, align_corners=False, antialias=True)
    if not native:
        y = (y.clamp_(0, 255) if interpolation == "bicubic" else y).round_().to(torch.uint8)
    return y.reshape(channels, *size)


class EvalTransform:
    """PIL image -> uint8 tensor: the shorter side resized to `resize` (antialiased, on the uint8
    pixels), the centre `crop` x `crop` cut out; `normalize` (a Normalize) then scales a batch of
    them to [0, 1] and normalises it where the model runs. The arithmetic of torchvision's v2 eval
    transform step for step, equal to the bit (a test holds it there), in plain PyTorch:
    predict.py and validation start without importing torchvision."""

    def __init__(self, resize, crop, interpolation, mean, std):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.normalize = Normalize(mean, std)

    def __call__(self, img):
        return centre_crop(self.resized(pixels(img)), self.crop)

    def resized(self, x):
        channels, h, w = x.shape
        if w <= h:
            size = int(self.resize * h / w), self.resize
        else:
            size = self.resize, int(self.resize * w / h)
        return resize_uint8(x, size, self.interpolation)


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
