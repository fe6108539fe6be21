"""Weights files: torchvision's official ones, the tutorial's, and this repo's checkpoints, read
into this repo's naming, checked against the network before any value is used, and loaded.

    from model import create_model
    from weight_files import load_weights, read_weights
    sd, info = read_weights("efficientnet_b0_rwightman-7f5810bc.pth")   # info: variant, classes, ...
    model = load_weights(create_model(info["variant"], num_classes=5), "efficientnet_b0_rwightman-7f5810bc.pth")

torchvision names a block `features.<stage>.<i>.block.<j>` with j counting its layers; the
tutorial (and this repo's B0-B7) `features.<stage><letter>.block.<layer name>`: `_from_torchvision`
renames. EfficientNetV2 has torchvision's names here too, so its files load as they are. Which
variant a file holds is read from its shapes (`variant_of`), never from its name.
"""
import functools
import re
from collections import OrderedDict

import torch
from torch import nn

from checkpoint import load_checkpoint, read_meta, tensor_problem
from errors import WeightsError
from model import V2_STAGES, VARIANTS, block_name, create_model, make_divisible, stage_repeats, title

# BatchNorm eps of torchvision's weight files: B0-B4 were trained with PyTorch's default (1e-5),
# B5-B7, ported from TensorFlow, with Keras' (1e-3, also the paper's and this repo's default), V2 with 1e-3
TORCHVISION_BN_EPS = {name: 1e-5 if name in ("b0", "b1", "b2", "b3", "b4") else 1e-3 for name in VARIANTS}


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
    """(blocks, stem width, width of the last conv): unique for each variant. A block is
    `features.2a` (B0-B7 in this repo's names) or `features.2.0` (V2, as torchvision)."""
    blocks = {m.group(1) for k in sd if (m := re.match(r"features\.(\d+[a-z]+|\d+\.\d+)\.block\.", k))}
    stem = sd.get("features.stem_conv.0.weight", sd.get("features.0.0.weight"))
    convs = [k for k in sd if re.fullmatch(r"features\.[1-9]\d*\.0\.weight", k)]  # V2's last conv
    last = sd.get("features.top.0.weight", sd[max(convs, key=lambda k: int(k.split(".")[1]))] if convs else None)
    return len(blocks), None if stem is None else stem.shape[0], None if last is None else last.shape[0]


@functools.cache
def _shapes(name):
    """Variant `name`'s state_dict on the meta device (shapes only: no memory, no computation)."""
    with torch.device("meta"):
        return create_model(name, num_classes=1).state_dict()


def _planned_signature(name):
    """_signature of variant `name`, from model.py's tables (without building the network)."""
    if name in V2_STAGES:
        stages = V2_STAGES[name]
        return sum(s.repeats for s in stages), stages[0].cin, 1280
    v = VARIANTS[name]
    return sum(stage_repeats(v.depth)), make_divisible(32 * v.width), make_divisible(1280 * v.width)


_SIGNATURE_TO_VARIANT = {_planned_signature(name): name for name in VARIANTS}


def variant_of(sd):
    """The variant whose network has `sd`'s blocks and widths (in this repo's names), or None."""
    return _SIGNATURE_TO_VARIANT.get(_signature(sd))


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
    ours = "efficientnet-scripts" if "variant" in meta else None
    if "features.0.0.weight" in sd and variant_of(sd) in V2_STAGES:  # V2: torchvision's names are ours
        fmt = ours or "torchvision"
    elif "features.0.0.weight" in sd:
        fmt, sd = "torchvision", _from_torchvision(sd)
    elif "features.stem_conv.0.weight" in sd:
        fmt = ours or "tutorial"
    else:
        raise WeightsError(f"{where} is not an EfficientNet state_dict (no stem conv among its keys)")
    variant = variant_of(sd)
    if variant is None:
        blocks, stem, top = _signature(sd)
        raise WeightsError(f"{where} does not match any of EfficientNet B0-B7 or EfficientNetV2-S/M/L "
                           f"({blocks} blocks, stem width {stem}, top width {top})")
    if problem := layout_problem(sd, variant):
        raise WeightsError(f"{where}: {problem}; it is not a weights file of {title(variant)}")
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
    fine-tune); its two tensors must agree."""
    expected = {k: v.shape for k, v in _shapes(variant).items()}
    head = sd.get("classifier.1.weight")
    classes = head.shape[0] if head is not None and head.dim() == 2 else "classes"
    expected["classifier.1.weight"] = [classes, expected["classifier.1.weight"][1]]
    expected["classifier.1.bias"] = [classes]
    for key, value in sd.items():
        if key not in expected:
            return f"it holds {key}, which the model has not"
        a_count = key.endswith("num_batches_tracked") and value.numel() == 1  # 0-d or [1]: both load
        if list(value.shape) != list(expected[key]) and not a_count:
            return f"{key} has shape {list(value.shape)} where the model's is {list(expected[key])}"
    missing = [k for k in expected if k not in sd and not k.startswith("classifier.")]
    return f"it lacks {missing[0]} (and {len(missing) - 1} more)" if missing else None


def load_weights(model, weights, verbose=True):
    """`model` (an EfficientNet of model.py) with `weights` loaded: a path, or a loaded file (a
    state_dict or a checkpoint) in torchvision's, the tutorial's or this repo's format, and the
    BatchNorm eps the file was trained with. A file with another class count leaves the model's
    fresh classifier; anything else that does not fit is a WeightsError."""
    sd, info = read_weights(weights)
    where = "the given weights" if isinstance(weights, dict) else str(weights)
    name = variant_of(model.state_dict())
    if name is None:
        raise WeightsError(f"load_weights reads weights into EfficientNet B0-B7 or EfficientNetV2 of model.py, "
                           f"not into a {type(model).__name__} of another layout")
    num_classes = model.classifier[1].out_features
    if info["variant"] != name:
        raise WeightsError(f"{where} holds {title(info['variant'])} weights, not "
                           f"{title(name)}: use --model {info['variant']}")
    if info["num_classes"] != num_classes:
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("classifier."))
        if verbose and info["num_classes"] is not None:
            print(f"note: {where} has a {info['num_classes']}-class head; "
                  f"a new {num_classes}-class classifier is initialised")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise WeightsError(f"{where} does not fit {title(name)}: "
                           f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise WeightsError(f"{where} does not fit {title(name)}: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.bn_eps = info["bn_eps"]  # the eps the file was trained with
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = info["bn_eps"]
    return model
