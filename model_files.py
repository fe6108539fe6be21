"""Every file that holds or describes a model, read in one place: this repo's checkpoints,
torchvision's and the tutorial's state_dicts, export.py's .pt2 and .onnx files with their JSON
sidecar (whose layout is defined here, for writing and reading), and class_indices.json.

    model, info, transform, resize = model_files.load_model("weights/b0-digits/best.pth")
    names = model_files.class_names(info, "weights/b0-digits/best.pth", None, info["num_classes"])
"""
import hashlib
import json
import os

import torch

import checkpoint
from checkpoint import WeightsError
from cli import DataError, UsageError
from model import VARIANTS, Variant, create_model, fuse_bn, read_weights
from outputs import atomic_write_text
from transforms import build_transform


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
        v = Variant(v.width, v.depth, v.dropout, info["img_size"], info["eval_resize"], info["eval_crop"],
                    info["interpolation"], tuple(info["mean"]), tuple(info["std"]))
    return build_transform(v, v.eval_crop, train=False, eval_sizes=(v.eval_resize, v.eval_crop)), v.eval_resize


def averaged_weights(ckpt):
    """The EMA weights of a last.pth (what its validation scored and best.pth saves), or None: its
    "model" holds the raw training weights, which predict worse on small data."""
    ema = ckpt.get("ema") if isinstance(ckpt, dict) and "optimizer" in ckpt else None
    if not isinstance(ema, dict):
        return None
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")} or None


def load_model(weights, model_name=None, device=torch.device("cpu")):
    """(model ready for inference, what the file says of itself (read_weights' info: variant,
    class count, and for this repo's checkpoints classes and preprocessing), eval transform, resize).
    An exported .pt2 or .onnx (export.py) comes with what its FILE.json says."""
    weights = os.fspath(weights)
    if weights.endswith((".pt2", ".onnx")):
        return load_exported(weights, device)
    ckpt = checkpoint.load_checkpoint(weights)  # opened once: read_weights and create_model take the loaded file
    if ema := averaged_weights(ckpt):
        ckpt = dict(ckpt, model=ema)
    _, info = read_weights(ckpt, where=weights)
    info["ema"] = ema is not None
    if model_name is not None and model_name != info["variant"]:
        raise WeightsError(f"{weights} holds EfficientNet-{info['variant'].upper()} weights, not "
                           f"{model_name.upper()}: use --model {info['variant']} or leave --model out")
    model = create_model(info["variant"], info["num_classes"], weights=ckpt, verbose=False)
    model = fuse_bn(model).to(device, memory_format=torch.channels_last)
    transform, resize = eval_transform(info, info["variant"])
    return model, info, transform, resize


# ---------------------------------------------------------------------------------------------
# Exported files (export.py) and their sidecar
# ---------------------------------------------------------------------------------------------

SIDECAR_FORMAT = 1  # the version of FILE.json's layout; raise it when a field changes meaning
INTERPOLATIONS = ("bilinear", "bicubic")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sidecar(path, info, names, resize, crop, fmt, dynamic_batch, opset):
    """PATH.json beside an exported PATH: all that a caller needs to feed the model and read its answer."""
    v = VARIANTS[info["variant"]]
    batch = "batch" if dynamic_batch else 1
    side = {
        "format": SIDECAR_FORMAT, "file": os.path.basename(path), "sha256": sha256(path), "export": fmt,
        **({"onnx_opset": opset} if opset else {}),
        "variant": info["variant"], "classes": list(names),
        "input": {"name": "images", "shape": [batch, 3, crop, crop], "dtype": "float32",
                  "layout": "NCHW, RGB, (pixel / 255 - mean) / std"},
        "output": {"name": "logits", "shape": [batch, len(names)],
                   "meaning": "logits: softmax over the last axis gives the class probabilities"},
        "resize": resize, "crop": crop, "interpolation": info.get("interpolation") or v.interpolation,
        "mean": list(info.get("mean") or v.mean), "std": list(info.get("std") or v.std),
        "preprocess": f"resize the shorter side to {resize} (antialiased), centre crop {crop}x{crop}",
        "trained_with": {"no_hflip": bool((info.get("args") or {}).get("no_hflip", False))},
    }
    atomic_write_text(path + ".json", json.dumps(side, indent=1, ensure_ascii=False) + "\n")
    return side


def read_sidecar(path):
    """PATH.json of an exported PATH as read_weights' info, every field checked: the file may
    come from anyone, and a wrong field would mislabel every prediction or allocate without bound."""
    where = f"{path}.json"
    try:
        with open(where, encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} needs the {os.path.basename(path)}.json that export.py writes beside it "
                           f"({getattr(e, 'strerror', None) or e}); export again") from None

    def bad(field, wanted):
        return WeightsError(f"{where}: \"{field}\" must be {wanted}; this is not a sidecar export.py wrote "
                            "(export again from the best.pth)")

    if not isinstance(side, dict):
        raise bad("the file", "a JSON object")
    version = side.get("format")
    if not isinstance(version, int) or version < 1:
        raise bad("format", "a version number")
    if version > SIDECAR_FORMAT:
        raise WeightsError(f"{where} was written by a newer version of these scripts (sidecar format {version}, "
                           f"this one reads up to {SIDECAR_FORMAT}): update the scripts")
    if side.get("variant") not in VARIANTS:
        raise bad("variant", f"one of {', '.join(VARIANTS)}")
    classes = side.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise bad("classes", "a list of class names")
    shape = (side.get("input") or {}).get("shape") if isinstance(side.get("input"), dict) else None
    crop, resize = side.get("crop"), side.get("resize")
    if not (type(crop) is int and 32 <= crop <= 1024):
        raise bad("crop", "a whole number of pixels from 32 to 1024")
    if not (type(resize) is int and crop <= resize <= 2 * crop):
        raise bad("resize", "a whole number of pixels from crop to twice crop")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[0] in ("batch", 1) and shape[1:] == [3, crop, crop]):
        raise bad("input.shape", f'["batch" or 1, 3, {crop}, {crop}]')
    outputs = (side.get("output") or {}).get("shape") if isinstance(side.get("output"), dict) else None
    if outputs is not None and outputs[-1:] != [len(classes)]:
        raise bad("output.shape", f"[batch, {len(classes)}], one logit per class")
    if side.get("interpolation") not in INTERPOLATIONS:
        raise bad("interpolation", " or ".join(INTERPOLATIONS))
    for field, low in (("mean", -1e3), ("std", 1e-6)):
        values = side.get(field)
        if not (isinstance(values, list) and len(values) == 3
                and all(type(x) in (int, float) and low <= x <= 1e3 for x in values)):
            raise bad(field, "3 numbers" + (" above 0" if field == "std" else ""))
    if not isinstance(side.get("sha256"), str):
        raise bad("sha256", "the sha256 of the exported file")
    trained = side.get("trained_with", {})
    if not isinstance(trained, dict):
        raise bad("trained_with", "an object")
    return {"variant": side["variant"], "num_classes": len(classes), "classes": classes, "img_size": crop,
            "eval_resize": resize, "eval_crop": crop, "interpolation": side["interpolation"], "mean": side["mean"],
            "std": side["std"], "args": {"no_hflip": bool(trained.get("no_hflip", False))}, "source": "export",
            "sha256": side["sha256"], "dynamic_batch": shape[0] == "batch"}


def load_exported(path, device):
    """export.py's file and its FILE.json: a callable taking and returning torch tensors."""
    if not os.path.isfile(path):
        raise WeightsError(f"--weights: no file at {path}")
    info = read_sidecar(path)
    if sha256(path) != info["sha256"]:
        raise WeightsError(f"{path}.json describes another file (its sha256 differs): export again")
    model = ExportedModel(path, info["dynamic_batch"], device)
    transform, resize = eval_transform(info, info["variant"])
    return model, info, transform, resize


class ExportedModel:
    """An exported file as predict.py calls a model: a batch of images in, logits out (torch
    tensors). A file exported for one image at a time is called once per image."""

    def __init__(self, path, dynamic_batch, device):
        self.dynamic_batch, self.device = dynamic_batch, device
        if path.endswith(".pt2"):
            self.run = torch.export.load(path).module().to(device)
            return
        try:
            import onnxruntime
        except ImportError:
            raise UsageError(f"{path} is an ONNX file: pip install -r requirements-export.txt for onnxruntime "
                             "(or export --format pt2)") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.run = lambda x: torch.from_numpy(session.run(None, {"images": x.cpu().numpy()})[0]).to(device)

    def __call__(self, images):
        images = images.contiguous()
        if self.dynamic_batch:
            return self.run(images)
        return torch.cat([self.run(image[None]) for image in images])
