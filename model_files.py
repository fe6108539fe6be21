"""A trained model from any file that holds one, ready to predict with, and its class names:
this repo's checkpoints, torchvision's and the tutorial's state_dicts, export.py's .pt2 and .onnx
files (read by exported.py), and class_indices.json.

    model, info, transform, resize = model_files.load_model("weights/b0-digits/best.pth")
    names = model_files.class_names(info, "weights/b0-digits/best.pth", None, info["num_classes"])
"""
import dataclasses
import json
import os

import torch

import checkpoint
import exported
from errors import DataError, UsageError, WeightsError
from inference import fuse_bn
from model import VARIANTS, create_model, title
from outputs import atomic_write_text
from transforms import build_transform
from weight_files import load_weights, read_weights


def write_class_indices(path, classes):
    """class_indices.json as the tutorial writes it: {"0": "daisy", ...}."""
    atomic_write_text(path, json.dumps({str(i): c for i, c in enumerate(classes)}, indent=4))


def read_class_indices(path):
    """The class names of a class_indices.json, checked: {"0": name, ..., "n-1": name}, nothing else."""
    wanted = "it must map \"0\", \"1\", ... \"n-1\" to class names"
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise DataError(f"cannot read class names from {path}: not a regular file (a FIFO, socket or device), "
                        "reading it could wait forever")
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or e
        raise DataError(f"cannot read class names from {path} ({why}); {wanted}") from None
    if not (isinstance(mapping, dict) and mapping and set(mapping) == {str(i) for i in range(len(mapping))}
            and all(isinstance(name, str) for name in mapping.values())):
        raise DataError(f"cannot read class names from {path}: {wanted}")
    return [mapping[str(i)] for i in range(len(mapping))]


# ---------------------------------------------------------------------------------------------
# Weights files: this repo's, torchvision's, the tutorial's
# ---------------------------------------------------------------------------------------------

def class_names(info, weights_path, class_indices, num_classes):
    if class_indices:
        names = read_class_indices(class_indices)
    elif info.get("classes"):
        names = info["classes"]
    elif os.path.isfile(beside := os.path.join(os.path.dirname(os.path.abspath(weights_path)), "class_indices.json")):
        names = read_class_indices(beside)
    elif num_classes == 1000:  # ImageNet weights: the category names ship with torchvision
        names = imagenet_categories()
    else:
        names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise UsageError(f"the weights have {num_classes} classes but {len(names)} class names were found; "
                         "pass the matching --class-indices")
    return names


def imagenet_categories():
    """The 1000 ImageNet class names that torchvision ships, read from its source file rather than
    imported: importing torchvision takes a second, as long as predicting an image."""
    import ast
    import importlib.util
    try:
        spec = importlib.util.find_spec("torchvision")  # finds the package without running it
        with open(os.path.join(os.path.dirname(spec.origin), "models", "_meta.py"), encoding="utf-8") as f:
            for node in ast.parse(f.read()).body:
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_IMAGENET_CATEGORIES":
                    names = ast.literal_eval(node.value)
                    if len(names) == 1000:
                        return names
    except (OSError, AttributeError, TypeError, ValueError, SyntaxError):
        pass
    import torchvision  # another layout of torchvision's files: ask it
    return torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]


def eval_transform(info, variant_name):
    """The checkpoint's own eval preprocessing, or torchvision's for the variant of a raw file."""
    v = VARIANTS[variant_name]
    if "eval_crop" in info:
        v = dataclasses.replace(v, train_size=info["img_size"], eval_resize=info["eval_resize"],
                                eval_crop=info["eval_crop"], interpolation=info["interpolation"],
                                mean=tuple(info["mean"]), std=tuple(info["std"]))
    return build_transform(v, v.eval_crop, train=False, eval_sizes=(v.eval_resize, v.eval_crop)), v.eval_resize


def load_model(weights, model_name=None, device=torch.device("cpu")):
    """(model ready for inference, what the file says of itself (read_weights' info: variant,
    class count, and for this repo's checkpoints classes and preprocessing), eval transform (uint8
    out; its .normalize makes a batch of them the model's floats), resize).
    An exported .pt2 or .onnx (export.py) comes with what its FILE.json says."""
    weights = os.fspath(weights)
    if weights.endswith((".pt2", ".onnx")):
        model, info = exported.load_exported(weights, device)
        return (model, info, *eval_transform(info, info["variant"]))
    ckpt = checkpoint.load_checkpoint(weights)  # opened once: read_weights and load_weights take the loaded file
    if ema := checkpoint.averaged_weights(ckpt):
        ckpt = dict(ckpt, model=ema)
    _, info = read_weights(ckpt, where=weights)
    info["ema"] = ema is not None
    if info["num_classes"] is None:
        raise WeightsError(f"{weights} holds no classifier (classifier.1.weight), so it cannot predict; it can be "
                           f"fine-tuned: python train.py --weights {weights}")
    if model_name is not None and model_name != info["variant"]:
        raise WeightsError(f"{weights} holds {title(info['variant'])} weights, not "
                           f"{title(model_name)}: use --model {info['variant']} or leave --model out")
    model = load_weights(create_model(info["variant"], info["num_classes"]), ckpt, verbose=False)
    model = fuse_bn(model).to(device, memory_format=torch.channels_last)
    transform, resize = eval_transform(info, info["variant"])
    return model, info, transform, resize
