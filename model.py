"""EfficientNet B0-B7 (Tan & Le, 2019, https://arxiv.org/abs/1905.11946).

    from model import create_model
    model = create_model("b0", num_classes=5)                          # from scratch
    model = create_model("b0", num_classes=5, weights="efficientnet_b0_rwightman-7f5810bc.pth")

The network is a 3x3 stem, sixteen (B0) to fifty-five (B7) MBConv blocks in seven stages, a 1x1
"top" conv, global average pooling and a linear classifier. B1-B7 scale B0's width and depth
(compound scaling); `VARIANTS` below is the one table of per-variant numbers that every script reads.

Module names follow the tutorial this repo grows from (`features.stem_conv`, `features.2a.block.se`,
`features.top`, `classifier.1`), so its checkpoints load as they are. torchvision's official
weight files (`features.1.0.block.0.0.weight`, ...) are renamed on load; see `read_weights`.

Elsewhere, by subject: the memory-lean autograd Functions that ConvBNAct and SqueezeExcite use in
training (activations.py), BatchNorm folding and the fast CPU path for inference (inference.py).
"""
import contextlib
import math
import re
from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from activations import SigmoidGate, batchnorm_silu
from checkpoint import load_checkpoint, read_meta, tensor_problem
from errors import WeightsError


@dataclass(frozen=True)
class Variant:
    width: float        # channel multiplier
    depth: float        # block-count multiplier
    dropout: float      # before the classifier
    train_size: int     # the paper's resolution
    eval_resize: int    # torchvision's eval transform: resize the shorter side to this ...
    eval_crop: int      # ... then centre-crop this
    interpolation: str = "bicubic"
    mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, for all variants
    std: tuple = (0.229, 0.224, 0.225)

    @property
    def crop_pct(self):
        return self.eval_crop / self.eval_resize

    def eval_sizes(self, img_size):
        """(resize, crop) for a model trained at `img_size`, keeping torchvision's crop ratio."""
        return round(img_size / self.crop_pct), img_size


VARIANTS = {
    "b0": Variant(1.0, 1.0, 0.2, 224, 256, 224),
    "b1": Variant(1.0, 1.1, 0.2, 240, 256, 240),
    "b2": Variant(1.1, 1.2, 0.3, 260, 288, 288),
    "b3": Variant(1.2, 1.4, 0.3, 300, 320, 300),
    "b4": Variant(1.4, 1.8, 0.4, 380, 384, 380),
    "b5": Variant(1.6, 2.2, 0.4, 456, 456, 456),
    "b6": Variant(1.8, 2.6, 0.5, 528, 528, 528),
    "b7": Variant(2.0, 3.1, 0.5, 600, 600, 600),
}

# BatchNorm eps of torchvision's weight files: B0-B4 were trained with PyTorch's default (1e-5),
# B5-B7, ported from TensorFlow, with Keras' (1e-3, also the paper's and this repo's default)
TORCHVISION_BN_EPS = {name: 1e-5 if name in ("b0", "b1", "b2", "b3", "b4") else 1e-3 for name in VARIANTS}

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
    """'b3', 'B3', 'efficientnet_b3' and 'efficientnet-b3' all mean 'b3'."""
    key = str(name).lower().replace("efficientnet", "").strip("_-")
    if key not in VARIANTS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(VARIANTS)}")
    return key


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


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise conv, squeeze-excite, 1x1 project, skip."""

    def __init__(self, cin, cout, expand, kernel, stride, drop_prob, norm):
        super().__init__()
        mid = cin * expand
        layers = OrderedDict()
        if expand != 1:
            layers["expand_conv"] = ConvBNAct(cin, mid, 1, norm=norm)
        layers["dwconv"] = ConvBNAct(mid, mid, kernel, stride, groups=mid, norm=norm)
        # the squeeze width comes from the block's input channels, not the expanded ones
        layers["se"] = SqueezeExcite(mid, max(1, cin // 4), activation=nn.SiLU)
        layers["project_conv"] = ConvBNAct(mid, cout, 1, act=False, norm=norm)
        self.block = nn.Sequential(layers)
        self.use_skip = stride == 1 and cin == cout
        # stochastic depth: during training the whole residual branch is dropped per sample
        self.drop_path = DropPath(drop_prob)

    def forward(self, x):
        out = self.block(x)
        if self.use_skip:
            out = self.drop_path(out) + x
        return out


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
                if isinstance(m, MBConv) and m.use_skip:
                    nn.init.zeros_(m.block.project_conv[1].weight)
        self.reset_classifier(self.classifier[1].out_features)

    def reset_classifier(self, num_classes):
        old = self.classifier[1]
        self.classifier[1] = nn.Linear(old.in_features, num_classes, device=old.weight.device)
        # small weights, so training starts from near-uniform predictions (loss ~ ln(classes))
        # whatever the class count; torchvision's 1/sqrt(classes) range suits only 1000 classes
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    def forward(self, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # recompute each block's activations in backward: less memory, same gradients. The
            # recomputation must not count the batch in the BatchNorm statistics again. Eager, a
            # context_fn freezes them while it runs. Compiled, none is needed (and Dynamo refuses
            # any but selective checkpointing's): AOTAutograd applies the buffer updates once, in
            # the forward graph, and backward recomputes only the pure operations
            for block in self.features:
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


def efficientnet(name, num_classes=1000, dropout=None, **options):
    """EfficientNet `name` with the variant's dropout before the classifier, or `dropout`."""
    v = VARIANTS[variant_name(name)]
    return EfficientNet(v.width, v.depth, v.dropout if dropout is None else dropout, num_classes, **options)


def efficientnet_b0(num_classes=1000, **options): return efficientnet("b0", num_classes, **options)
def efficientnet_b1(num_classes=1000, **options): return efficientnet("b1", num_classes, **options)
def efficientnet_b2(num_classes=1000, **options): return efficientnet("b2", num_classes, **options)
def efficientnet_b3(num_classes=1000, **options): return efficientnet("b3", num_classes, **options)
def efficientnet_b4(num_classes=1000, **options): return efficientnet("b4", num_classes, **options)
def efficientnet_b5(num_classes=1000, **options): return efficientnet("b5", num_classes, **options)
def efficientnet_b6(num_classes=1000, **options): return efficientnet("b6", num_classes, **options)
def efficientnet_b7(num_classes=1000, **options): return efficientnet("b7", num_classes, **options)


# ---------------------------------------------------------------------------------------------
# Weights: torchvision's files, the tutorial's files and this repo's checkpoints
# ---------------------------------------------------------------------------------------------

def _unwrap(obj):
    """The state_dict inside a checkpoint: {'model': sd}, {'state_dict': sd} or sd itself."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _from_torchvision(sd):
    """Rename torchvision's keys to ours. features.0 is the stem, 1-7 the stages, 8 the top conv;
    a block's `block.j` children are (expand, dw, se, project) or, without expansion, (dw, se, project)."""
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("features."))
    blocks_with_expand = {m.group(1) for k in sd if (m := re.match(r"features\.(\d+\.\d+)\.block\.3\.", k))}
    out = OrderedDict()
    for key, value in sd.items():
        if m := re.match(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(.*)", key):
            stage, i, j, rest = m.groups()
            parts = ["expand_conv", "dwconv", "se", "project_conv"]
            if f"{stage}.{i}" not in blocks_with_expand:
                parts = parts[1:]
            key = f"features.{block_name(stage, int(i))}.block.{parts[int(j)]}.{rest}"
        elif m := re.match(r"features\.(\d+)\.(.*)", key):
            stage, rest = m.groups()
            key = f"features.{'stem_conv' if stage == '0' else 'top' if int(stage) == last else stage}.{rest}"
        out[key] = value
    return out


def _signature(sd):
    """(number of MBConv blocks, top conv width): unique for each of B0-B7."""
    blocks = {k.split(".")[1] for k in sd if re.match(r"features\.\d+[a-z]+\.", k)}
    top = sd.get("features.top.0.weight")
    return len(blocks), None if top is None else top.shape[0]


_SIGNATURE_TO_VARIANT = {
    (sum(stage_repeats(v.depth)), make_divisible(1280 * v.width)): name
    for name, v in VARIANTS.items()
}


def read_weights(source, where="weights"):
    """A state_dict in this repo's naming plus what the file tells about itself.

    `source` is a path or an already loaded object. Returns (state_dict, info) where info has
    'variant', 'num_classes', 'bn_eps', 'source' (torchvision, tutorial or efficientnet-scripts)
    and, for this repo's checkpoints, their metadata (checkpoint.py).
    """
    if not isinstance(source, dict):
        where = str(source)
        source = load_checkpoint(source)
    sd = _unwrap(source)
    meta = read_meta(source, where)  # this repo's checkpoints describe themselves
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{where} holds no state_dict of tensors; expected an EfficientNet weights file")
    for key, value in sd.items():  # before any computation on the values
        if problem := tensor_problem(key, value):
            raise WeightsError(f"{where}: {key} is {problem}; this is not a weights file of an EfficientNet")
    broken = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise WeightsError(f"{where} holds NaN or infinite values ({len(broken)} tensors, e.g. {broken[0]}): "
                           "the training that wrote it diverged; use an earlier checkpoint")
    # DDP and torch.compile add prefixes to every key
    sd = OrderedDict((re.sub(r"^(module\.|_orig_mod\.)+", "", k), v) for k, v in sd.items())
    if "features.0.0.weight" in sd:
        fmt, sd = "torchvision", _from_torchvision(sd)
    elif "features.stem_conv.0.weight" in sd:
        fmt = "efficientnet-scripts" if "variant" in meta else "tutorial"
    else:
        raise WeightsError(f"{where} is not an EfficientNet state_dict (no stem conv among its keys)")
    variant = _SIGNATURE_TO_VARIANT.get(_signature(sd))
    if variant is None:
        raise WeightsError(f"{where} does not match any of EfficientNet B0-B7 "
                           f"({_signature(sd)[0]} blocks, top width {_signature(sd)[1]})")
    if problem := layout_problem(sd, variant):
        raise WeightsError(f"{where}: {problem}; it is not a weights file of EfficientNet-{variant.upper()}")
    default_eps = TORCHVISION_BN_EPS[variant] if fmt == "torchvision" else 1e-3
    info = dict(meta, variant=variant, source=fmt, bn_eps=meta.get("bn_eps", default_eps),
                num_classes=sd["classifier.1.weight"].shape[0] if "classifier.1.weight" in sd else None)
    if info["num_classes"] is None and fmt == "efficientnet-scripts":  # train.py always saves its classifier
        raise WeightsError(f"{where} holds no classifier (classifier.1.weight); this checkpoint was not written by "
                           "train.py as it stands")
    if meta.get("classes") is not None and info["num_classes"] is not None \
            and len(meta["classes"]) != info["num_classes"]:  # each name would label another output
        raise WeightsError(f"{where} names {len(meta['classes'])} classes but its classifier has "
                           f"{info['num_classes']} outputs; this checkpoint was not written by train.py as it stands")
    return sd, info


def layout_problem(sd, variant):
    """The first key of `sd` that EfficientNet `variant` has not, lacks, or holds in another shape,
    said, or None. The classifier may have any class count (and may be missing: a backbone to
    fine-tune); its two tensors must agree. The shapes come from a model on the meta device: no
    memory, no computation."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in efficientnet(variant, num_classes=1).state_dict().items()}
    head = sd.get("classifier.1.weight")
    classes = head.shape[0] if head is not None and head.dim() == 2 else "classes"
    expected["classifier.1.weight"] = [classes, expected["classifier.1.weight"][1]]
    expected["classifier.1.bias"] = [classes]
    for key, value in sd.items():
        if key not in expected:
            return f"it holds {key}, which the model has not"
        if list(value.shape) != list(expected[key]) and not (key.endswith("num_batches_tracked") and value.numel() == 1):
            return f"{key} has shape {list(value.shape)} where the model's is {list(expected[key])}"
    missing = [k for k in expected if k not in sd and not k.startswith("classifier.")]
    return f"it lacks {missing[0]} (and {len(missing) - 1} more)" if missing else None


def create_model(name="b0", num_classes=1000, weights=None, verbose=True, **options):
    """EfficientNet `name` ('b0'..'b7'), optionally loaded from `weights`: a path, or a loaded file
    (a state_dict or a checkpoint) in torchvision's, the tutorial's or this repo's format. A file
    with another class count gets a fresh classifier; anything else that does not fit is a
    WeightsError. `options` go to efficientnet(): dropout, drop_path_rate, bn_eps, grad_checkpointing, lean."""
    name = variant_name(name)
    if weights is None:
        return efficientnet(name, num_classes, **options)
    sd, info = read_weights(weights)
    where = "the given weights" if isinstance(weights, dict) else str(weights)
    if info["variant"] != name:
        raise WeightsError(f"{where} holds EfficientNet-{info['variant'].upper()} weights, not "
                           f"{name.upper()}: use --model {info['variant']}")
    options.setdefault("bn_eps", info["bn_eps"])
    model = efficientnet(name, num_classes, **options)
    if info["num_classes"] != num_classes:
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("classifier."))
        if verbose and info["num_classes"] is not None:
            print(f"note: {where} has a {info['num_classes']}-class head; "
                  f"a new {num_classes}-class classifier is initialised")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise WeightsError(f"{where} does not fit EfficientNet-{name.upper()}: "
                           f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise WeightsError(f"{where} does not fit EfficientNet-{name.upper()}: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
