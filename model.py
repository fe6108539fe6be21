"""EfficientNet B0-B7 (Tan & Le, 2019, https://arxiv.org/abs/1905.11946).

    from model import create_model
    from weight_files import load_weights
    model = create_model("b0", num_classes=5)                          # from scratch
    model = load_weights(create_model("b0", num_classes=5), "efficientnet_b0_rwightman-7f5810bc.pth")

The network is a 3x3 stem, sixteen (B0) to fifty-five (B7) MBConv blocks in seven stages, a 1x1
"top" conv, global average pooling and a linear classifier. B1-B7 scale B0's width and depth
(compound scaling); `VARIANTS` below is the one table of per-variant numbers that every script reads.

Module names follow the tutorial this repo grows from (`features.stem_conv`, `features.2a.block.se`,
`features.top`, `classifier.1`), so its checkpoints load as they are. torchvision's official
weight files (`features.1.0.block.0.0.weight`, ...) are renamed on load (weight_files.py).

EfficientNetV2 S/M/L (Tan & Le, 2021, https://arxiv.org/abs/2104.00298), `create_model("v2_s")`:
FusedMBConv stages then MBConv stages, one table a variant (`V2_STAGES`), named as torchvision
names them, so its files load as they are. VARIANTS holds their sizes too.

Elsewhere, by subject: the memory-lean autograd Functions that ConvBNAct and SqueezeExcite use in
training (activations.py), BatchNorm folding and the fast CPU path for inference (inference.py).
"""
import contextlib
import math
from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from activations import SigmoidGate, batchnorm_silu


@dataclass(frozen=True)
class Variant:
    width: float        # channel multiplier (B0-B7; V2 has a table of its own, V2_STAGES)
    depth: float        # block-count multiplier
    dropout: float      # before the classifier
    train_size: int     # the paper's resolution
    eval_resize: int    # torchvision's eval transform: resize the shorter side to this ...
    eval_crop: int      # ... then centre-crop this
    interpolation: str = "bicubic"
    mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, for all variants but V2-L
    std: tuple = (0.229, 0.224, 0.225)
    params: int = 0     # at 1000 classes, as torchvision's
    top1: float = 0.0   # torchvision's weights, ImageNet top-1 (%) at eval_crop

    @property
    def crop_pct(self):
        return self.eval_crop / self.eval_resize

    def eval_sizes(self, img_size):
        """(resize, crop) for a model trained at `img_size`, keeping torchvision's crop ratio."""
        return round(img_size / self.crop_pct), img_size


VARIANTS = {
    "b0": Variant(1.0, 1.0, 0.2, 224, 256, 224, params=5_288_548, top1=77.692),
    "b1": Variant(1.0, 1.1, 0.2, 240, 256, 240, params=7_794_184, top1=78.642),
    "b2": Variant(1.1, 1.2, 0.3, 260, 288, 288, params=9_109_994, top1=80.608),
    "b3": Variant(1.2, 1.4, 0.3, 300, 320, 300, params=12_233_232, top1=82.008),
    "b4": Variant(1.4, 1.8, 0.4, 380, 384, 380, params=19_341_616, top1=83.384),
    "b5": Variant(1.6, 2.2, 0.4, 456, 456, 456, params=30_389_784, top1=83.444),
    "b6": Variant(1.8, 2.6, 0.5, 528, 528, 528, params=43_040_704, top1=84.008),
    "b7": Variant(2.0, 3.1, 0.5, 600, 600, 600, params=66_347_960, top1=84.122),
    # EfficientNetV2: trained smaller than evaluated (the paper's progressive resizing ends there)
    "v2_s": Variant(None, None, 0.2, 300, 384, 384, "bilinear", params=21_458_488, top1=84.228),
    "v2_m": Variant(None, None, 0.3, 384, 480, 480, "bilinear", params=54_139_356, top1=85.112),
    "v2_l": Variant(None, None, 0.4, 384, 480, 480, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                    params=118_515_272, top1=85.808),
}

# --model's help (for argparse, which needs % doubled)
VARIANTS_HELP = "variant: training size, parameters, ImageNet top-1 of torchvision's weights: " + ", ".join(
    f"{name} {v.train_size}px {v.params / 1e6:.1f}M {v.top1:.1f}%%" for name, v in VARIANTS.items())

# the image sizes (pixels) the scripts accept: at 32 the last feature map is 1x1; far above 1024
# a single image fills the memory, and export.py's programs are bounded there
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 1024

# B0's seven stages; `stride` is the first block's, the others have stride 1
Stage = namedtuple("Stage", "expand kernel stride cin cout repeats")
STAGES = [
    Stage(1, 3, 1, 32, 16, 1),
    Stage(6, 3, 2, 16, 24, 2),
    Stage(6, 5, 2, 24, 40, 2),
    Stage(6, 3, 2, 40, 80, 3),
    Stage(6, 5, 1, 80, 112, 3),
    Stage(6, 5, 2, 112, 192, 4),
    Stage(6, 3, 1, 192, 320, 1),
]


def stage_repeats(depth):
    """Blocks per stage for a depth multiplier: B0's counts scaled and rounded up."""
    return [math.ceil(stage.repeats * depth) for stage in STAGES]


def block_name(stage, i):
    """The tutorial's block names: stage 2's blocks are '2a', '2b', ..."""
    return f"{stage}{chr(ord('a') + i)}"


def variant_name(name):
    """'b3', 'B3', 'efficientnet_b3' and 'efficientnet-b3' all mean 'b3'; 'efficientnet_v2_s' and
    'V2-S' mean 'v2_s'."""
    key = str(name).lower().replace("efficientnet", "").strip("_-").replace("-", "_")
    if key not in VARIANTS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(VARIANTS)}")
    return key


def title(name):
    """The name a person reads: 'EfficientNet-B3', 'EfficientNetV2-S'."""
    key = variant_name(name)
    return f"EfficientNetV2-{key[3:].upper()}" if key.startswith("v2_") else f"EfficientNet-{key.upper()}"


def make_divisible(channels, divisor=8):
    """Round to the nearest multiple of 8 (hardware-friendly), never more than 10 % down."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias, 'same' padding) -> BatchNorm -> SiLU; `act=False` for the linear projection."""

    lean = False  # EfficientNet(lean=True) turns on BatchNormSiLU (activations.py) for its layers

    def __init__(self, cin, cout, kernel=1, stride=1, groups=1, act=True, norm=nn.BatchNorm2d):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            norm(cout),
            nn.SiLU(inplace=True) if act else nn.Identity(),
        )

    def forward(self, x):
        conv, norm, act = self
        if self.lean and norm.training and torch.is_grad_enabled() and type(norm) is nn.BatchNorm2d \
                and type(act) is nn.SiLU:
            return batchnorm_silu(conv(x), norm)  # same result, less memory
        return act(norm(conv(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation, x * sigmoid(fc2(act(fc1(pool(x))))), laid out as torchvision's
    SqueezeExcitation (same modules in the same order, same weight names and initialisation)."""

    lean = False  # EfficientNet(lean=True): SigmoidGate in training, the gate in place without gradients

    def __init__(self, channels, squeeze, activation=nn.SiLU):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        z = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        if not self.lean:
            return self.scale_activation(z) * x
        if x.requires_grad or z.requires_grad:
            return SigmoidGate.apply(x, z)
        return x.mul_(z.sigmoid_())  # x is the block's own intermediate and is not read again


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability
    p and the kept ones are scaled by 1 / (1 - p); identity in eval. Draws the same random
    numbers as torchvision's StochasticDepth(p, "row")."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        keep.bernoulli_(1.0 - self.p)
        if self.p < 1.0:
            keep.div_(1.0 - self.p)
        return x * keep

    def extra_repr(self):
        return f"p={self.p}"


class Residual(nn.Module):
    """A block's layers (`block`), and the skip around them where the shapes allow (`use_skip`),
    the branch dropped per sample in training (stochastic depth, `drop_path`)."""

    def forward(self, x):
        out = self.block(x)
        if self.use_skip:
            out = self.drop_path(out) + x
        return out


class MBConv(Residual):
    """Mobile inverted bottleneck: 1x1 expand, depthwise conv, squeeze-excite, 1x1 project, skip.
    Its layers are named as the tutorial names them (block.expand_conv, block.dwconv, ...), or, with
    `numbered`, as torchvision numbers them (block.0, block.1, ...: EfficientNetV2's layout)."""

    def __init__(self, cin, cout, expand, kernel, stride, drop_prob, norm, numbered=False):
        super().__init__()
        mid = cin * expand
        layers = OrderedDict()
        if expand != 1:
            layers["expand_conv"] = ConvBNAct(cin, mid, 1, norm=norm)
        layers["dwconv"] = ConvBNAct(mid, mid, kernel, stride, groups=mid, norm=norm)
        # the squeeze width comes from the block's input channels, not the expanded ones
        layers["se"] = SqueezeExcite(mid, max(1, cin // 4), activation=nn.SiLU)
        layers["project_conv"] = ConvBNAct(mid, cout, 1, act=False, norm=norm)
        self.block = nn.Sequential(*layers.values()) if numbered else nn.Sequential(layers)
        self.use_skip = stride == 1 and cin == cout
        # stochastic depth: during training the whole residual branch is dropped per sample
        self.drop_path = DropPath(drop_prob)


class FusedMBConv(Residual):
    """EfficientNetV2's early block (Tan & Le, 2021): MBConv's 1x1 expand and depthwise conv fused
    into one full kxk conv, no squeeze-excite, then the 1x1 project (none when it does not
    expand), and the skip. Layers numbered as torchvision's."""

    def __init__(self, cin, cout, expand, kernel, stride, drop_prob, norm):
        super().__init__()
        if expand == 1:
            layers = [ConvBNAct(cin, cout, kernel, stride, norm=norm)]
        else:  # the fused expand, then the project
            layers = [ConvBNAct(cin, cin * expand, kernel, stride, norm=norm),
                      ConvBNAct(cin * expand, cout, 1, act=False, norm=norm)]
        self.block = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_prob)


class EfficientNet(nn.Module):
    def __init__(self, width, depth, dropout, num_classes=1000, drop_path_rate=0.2,
                 bn_eps=1e-3, bn_momentum=0.1, grad_checkpointing=False, lean=True, zero_init_residual=True):
        super().__init__()
        self.bn_eps = bn_eps  # 1e-3 as in the paper (TF); torchvision's B0-B4 weights need 1e-5
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        ch = lambda c: make_divisible(c * width)  # noqa: E731
        repeats = stage_repeats(depth)

        layers = OrderedDict(stem_conv=ConvBNAct(3, ch(32), 3, 2, norm=norm))
        index, total = 0, sum(repeats)
        for number, (stage, n) in enumerate(zip(STAGES, repeats), 1):
            for i in range(n):
                # deeper blocks are dropped more often: the rate rises linearly from 0 to drop_path_rate
                layers[block_name(number, i)] = MBConv(
                    ch(stage.cin) if i == 0 else ch(stage.cout), ch(stage.cout), stage.expand, stage.kernel,
                    stage.stride if i == 0 else 1, drop_path_rate * index / total, norm)
                index += 1
        layers["top"] = ConvBNAct(ch(320), ch(1280), 1, norm=norm)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(ch(1280), num_classes))
        self.grad_checkpointing = grad_checkpointing
        for m in self.modules():
            if isinstance(m, (ConvBNAct, SqueezeExcite)):
                m.lean = lean
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual=True):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # each residual block starts as the identity (its last BatchNorm scales by 0), so a
            # fresh network is as shallow as its stages and learns depth as it trains (Goyal et
            # al. 2017): from scratch on small data it learned faster and further, see README
            for m in self.modules():
                if isinstance(m, Residual) and m.use_skip:
                    nn.init.zeros_(m.block[-1][1].weight)  # the last layer's BatchNorm
        self.reset_classifier(self.classifier[1].out_features)

    def reset_classifier(self, num_classes):
        old = self.classifier[1]
        self.classifier[1] = nn.Linear(old.in_features, num_classes, device=old.weight.device)
        # small weights, so training starts from near-uniform predictions (loss ~ ln(classes))
        # whatever the class count; torchvision's 1/sqrt(classes) range suits only 1000 classes
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    def blocks(self):
        """The layers in order, each recomputed on its own with grad_checkpointing: features' children."""
        return list(self.features)

    def forward(self, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # recompute each block's activations in backward: less memory, same gradients. The
            # recomputation must not count the batch in the BatchNorm statistics again. Eager, a
            # context_fn freezes them while it runs. Compiled, none is needed (and Dynamo refuses
            # any but selective checkpointing's): AOTAutograd applies the buffer updates once, in
            # the forward graph, and backward recomputes only the pure operations
            for block in self.blocks():
                frozen = {} if torch.compiler.is_compiling() else {
                    "context_fn": lambda b=block: (contextlib.nullcontext(), _bn_stats_frozen(b))}
                x = checkpoint(block, x, use_reentrant=False, **frozen)
        else:
            x = self.features(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@contextlib.contextmanager
def _bn_stats_frozen(module):
    """BatchNorm as usual, but its running statistics left as they are: a checkpointed block's
    recomputation must not count the same batch twice."""
    # _BatchNorm: BatchNorm2d and SyncBatchNorm (train.py --sync-bn), which is not a BatchNorm2d
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


# EfficientNetV2's stages (Tan & Le, 2021, table 4; torchvision's tables): fused: FusedMBConv
V2Stage = namedtuple("V2Stage", "fused expand kernel stride cin cout repeats")
V2_STAGES = {
    "v2_s": [V2Stage(True, 1, 3, 1, 24, 24, 2), V2Stage(True, 4, 3, 2, 24, 48, 4), V2Stage(True, 4, 3, 2, 48, 64, 4),
             V2Stage(False, 4, 3, 2, 64, 128, 6), V2Stage(False, 6, 3, 1, 128, 160, 9),
             V2Stage(False, 6, 3, 2, 160, 256, 15)],
    "v2_m": [V2Stage(True, 1, 3, 1, 24, 24, 3), V2Stage(True, 4, 3, 2, 24, 48, 5), V2Stage(True, 4, 3, 2, 48, 80, 5),
             V2Stage(False, 4, 3, 2, 80, 160, 7), V2Stage(False, 6, 3, 1, 160, 176, 14),
             V2Stage(False, 6, 3, 2, 176, 304, 18), V2Stage(False, 6, 3, 1, 304, 512, 5)],
    "v2_l": [V2Stage(True, 1, 3, 1, 32, 32, 4), V2Stage(True, 4, 3, 2, 32, 64, 7), V2Stage(True, 4, 3, 2, 64, 96, 7),
             V2Stage(False, 4, 3, 2, 96, 192, 10), V2Stage(False, 6, 3, 1, 192, 224, 19),
             V2Stage(False, 6, 3, 2, 224, 384, 25), V2Stage(False, 6, 3, 1, 384, 640, 7)],
}


class EfficientNetV2(EfficientNet):
    """EfficientNetV2 S/M/L: a 3x3 stem, FusedMBConv stages then MBConv stages (V2_STAGES), a 1x1
    conv to 1280 channels, pooling and the classifier. Parameters named and shaped as torchvision's
    efficientnet_v2_s/m/l (features.0 the stem, features.1-N the stages, each a list of blocks),
    so its files load as they are; training as EfficientNet (lean layers, drop path, EMA)."""

    def __init__(self, name, dropout=None, num_classes=1000, drop_path_rate=0.2, bn_eps=1e-3, bn_momentum=0.1,
                 grad_checkpointing=False, lean=True, zero_init_residual=True):
        nn.Module.__init__(self)
        self.bn_eps = bn_eps  # torchvision's V2 weights were trained with 1e-3 too
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        stages = V2_STAGES[name]
        layers = [ConvBNAct(3, stages[0].cin, 3, 2, norm=norm)]
        index, total = 0, sum(s.repeats for s in stages)
        for s in stages:
            blocks = []
            for i in range(s.repeats):
                cin, stride, drop = s.cin if i == 0 else s.cout, s.stride if i == 0 else 1, drop_path_rate * index / total
                blocks.append(FusedMBConv(cin, s.cout, s.expand, s.kernel, stride, drop, norm) if s.fused
                              else MBConv(cin, s.cout, s.expand, s.kernel, stride, drop, norm, numbered=True))
                index += 1
            layers.append(nn.Sequential(*blocks))
        layers.append(ConvBNAct(stages[-1].cout, 1280, 1, norm=norm))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(VARIANTS[name].dropout if dropout is None else dropout,
                                                   inplace=True), nn.Linear(1280, num_classes))
        self.grad_checkpointing = grad_checkpointing
        for m in self.modules():
            if isinstance(m, (ConvBNAct, SqueezeExcite)):
                m.lean = lean
        self.reset_parameters(zero_init_residual)

    def blocks(self):
        """The stem, each block of each stage, the last conv."""
        return [block for layer in self.features for block in (layer if type(layer) is nn.Sequential else [layer])]


def efficientnet_v2_s(num_classes=1000, **options): return EfficientNetV2("v2_s", num_classes=num_classes, **options)
def efficientnet_v2_m(num_classes=1000, **options): return EfficientNetV2("v2_m", num_classes=num_classes, **options)
def efficientnet_v2_l(num_classes=1000, **options): return EfficientNetV2("v2_l", num_classes=num_classes, **options)


def efficientnet(name, num_classes=1000, dropout=None, **options):
    """EfficientNet or EfficientNetV2 `name` with the variant's dropout before the classifier, or `dropout`."""
    name = variant_name(name)
    if name.startswith("v2_"):
        return EfficientNetV2(name, dropout, num_classes, **options)
    v = VARIANTS[name]
    return EfficientNet(v.width, v.depth, v.dropout if dropout is None else dropout, num_classes, **options)


def efficientnet_b0(num_classes=1000, **options): return efficientnet("b0", num_classes, **options)
def efficientnet_b1(num_classes=1000, **options): return efficientnet("b1", num_classes, **options)
def efficientnet_b2(num_classes=1000, **options): return efficientnet("b2", num_classes, **options)
def efficientnet_b3(num_classes=1000, **options): return efficientnet("b3", num_classes, **options)
def efficientnet_b4(num_classes=1000, **options): return efficientnet("b4", num_classes, **options)
def efficientnet_b5(num_classes=1000, **options): return efficientnet("b5", num_classes, **options)
def efficientnet_b6(num_classes=1000, **options): return efficientnet("b6", num_classes, **options)
def efficientnet_b7(num_classes=1000, **options): return efficientnet("b7", num_classes, **options)


def create_model(name="b0", num_classes=1000, **options):
    """EfficientNet `name` ('b0'..'b7', 'v2_s', 'v2_m', 'v2_l'), freshly initialised; weight_files.load_weights loads a
    file into it. `options` go to efficientnet(): dropout, drop_path_rate, bn_eps,
    grad_checkpointing, lean."""
    return efficientnet(variant_name(name), num_classes, **options)
