"""The files export.py writes, read back without running anything they hold: the .pt2 program
(checked entry by entry before torch reads it) or the .onnx model (run by ONNX Runtime), and the
JSON sidecar FILE.json beside each, whose layout is defined here for writing and reading.

    model, info = exported.load_exported("weights/b0-digits/best.onnx", torch.device("cpu"))
    logits = model(images)        # a float32 batch [N, 3, crop, crop] in, [N, classes] out
"""
import hashlib
import io
import json
import os
import re
import zipfile

import torch

import checkpoint
import cli
from errors import WeightsError
from errors import UsageError
from model import VARIANTS
from outputs import atomic_write_text



SIDECAR_FORMAT = 1  # the version of FILE.json's layout; raise it when a field changes meaning


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
    text = json.dumps(side, indent=1, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a class folder name that is not UTF-8: \\u escapes keep the file valid UTF-8
        text = json.dumps(side, indent=1)
    atomic_write_text(path + ".json", text + "\n")
    return side


def read_sidecar(path):
    """PATH.json of an exported PATH as read_weights' info, every field checked: the file may
    come from anyone, and a wrong field would mislabel every prediction or allocate without bound."""
    where = f"{path}.json"
    if os.path.exists(where) and not os.path.isfile(where):
        raise WeightsError(f"{where} is not a regular file; {path} needs the sidecar that export.py writes beside it")
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
    problem = checkpoint.preprocessing_problem(resize, crop, side.get("interpolation"), side.get("mean"),
                                               side.get("std"))
    if problem:
        raise bad(*problem)
    if not (isinstance(shape, list) and len(shape) == 4 and shape[0] in ("batch", 1) and shape[1:] == [3, crop, crop]):
        raise bad("input.shape", f'["batch" or 1, 3, {crop}, {crop}]')
    outputs = (side.get("output") or {}).get("shape") if isinstance(side.get("output"), dict) else None
    if not (isinstance(outputs, list) and outputs[-1:] == [len(classes)]):
        raise bad("output.shape", f"[batch, {len(classes)}], one logit per class")
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
    """(model, info) of export.py's file and its FILE.json: the model a callable taking and
    returning torch tensors, info as read_sidecar gives it."""
    if not os.path.isfile(path):
        raise WeightsError(f"--weights: no file at {path}" if not os.path.exists(path) else
                           f"--weights {path} is not a regular file (a FIFO, socket or device)")
    info = read_sidecar(path)
    if sha256(path) != info["sha256"]:
        raise WeightsError(f"{path}.json describes another file (its sha256 differs): export again")
    model = ExportedModel(path, info["dynamic_batch"], device)
    batch, crop = None if info["dynamic_batch"] else 1, info["eval_crop"]
    if (model.input_shape, model.output_shape) != ([batch, 3, crop, crop], [batch, info["num_classes"]]):
        raise WeightsError(f"{path} takes {model.input_shape} and gives {model.output_shape} but {path}.json says "
                           f"{[batch, 3, crop, crop]} and {[batch, info['num_classes']]} (None: any batch): "
                           "export again")
    return model, info


class ExportedModel:
    """An exported file as predict.py calls a model: a batch of images in, logits out (torch
    tensors). A file exported for one image at a time is called once per image, one exported for
    batches up to some size (older export.py: 4,096) with batches no larger.
    input_shape and output_shape: what the file says it takes and gives, None for any batch."""

    def __init__(self, path, dynamic_batch, device):
        self.device = device
        if path.endswith(".pt2"):
            with open(path, "rb") as f:
                data = f.read()  # checked and loaded from the same bytes
            self.input_shape, self.output_shape, max_batch = check_pt2(data, path)
            try:
                self.run = torch.export.load(io.BytesIO(data)).module().to(device)
            except Exception as e:  # noqa: BLE001 -- any way a checked archive can still fail to load
                raise WeightsError(f"cannot load {path} ({first_line(e)}): export again with this version of torch") \
                    from None
            self.max_batch = max_batch if dynamic_batch else 1
            return
        try:
            import onnxruntime
        except ImportError:
            raise UsageError(f"{path} is an ONNX file: pip install -r requirements-export.txt for onnxruntime "
                             "(or export --format pt2)") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime's own exception types
            raise WeightsError(f"{path} is not an ONNX model onnxruntime can run ({first_line(e)}): export again") \
                from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if [node.name for node in inputs] != ["images"] or len(outputs) != 1:
            raise WeightsError(f"{path} does not take one input named images and give one output: export again")
        self.input_shape, self.output_shape = ([d if type(d) is int else None for d in node.shape]
                                               for node in (inputs[0], outputs[0]))
        self.run = lambda x: torch.from_numpy(session.run(None, {"images": x.cpu().numpy()})[0]).to(device)
        self.max_batch = None if dynamic_batch else 1

    def __call__(self, images):
        images = images.contiguous()
        step = self.max_batch or len(images)
        return torch.cat([self.run(images[i:i + step]) for i in range(0, len(images), step)])


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# What a .pt2 that export.py wrote holds, and nothing else. torch.export.load runs code from any
# other (torch 2.14: torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py,
# torch/export/_unlift.py): it unpickles entries marked use_pickle and sample inputs that
# weights_only refuses, loads AOTInductor libraries, evaluates each size expression with sympy
# (eval), and writes the names, guards and stack traces inside into the Python source of the
# module it compiles. So the archive is read here first, and only a plain program passes: aten
# operators on tensors, names without quotes or spaces, sizes that are a number or one symbol.
PT2_ENTRIES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                         r"|models/model\.json|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json"
                         r"|data/weights/weight_\d+|data/constants/model_constants_config\.json)\Z")
PT2_NAME = re.compile(r"[A-Za-z0-9_.]*\Z")
PT2_SYMBOL = re.compile(r"Symbol\('([a-z]+\d+)'(?:, [a-z_]+=(?:True|False))*\)\Z")  # sympy's srepr of a size
PT2_METADATA = ("stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack")  # free text, kept out of code lines
PT2_ARGS = {"as_tensor", "as_tensors", "as_optional_tensors", "as_int", "as_ints", "as_float", "as_floats",
            "as_bool", "as_bools", "as_none", "as_string", "as_scalar_type", "as_memory_format", "as_layout",
            "as_device", "as_sym_int", "as_sym_ints"}
PT2_SPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}


def check_pt2(data, where):
    """(input shape, output shape, largest batch or None) of a .pt2 (bytes) that export.py could
    have written; WeightsError for anything else, before torch reads any of it."""
    def refuse(why):
        return WeightsError(f"refusing to load {where}: {why}. export.py never writes that, so running it could "
                            "run code that came with the file; export again from the best.pth")

    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = reader.get_all_records()
    except Exception:  # noqa: BLE001 -- zipfile's and torch's reader's own errors
        raise WeightsError(f"{where} is not a .pt2 archive (torch.export.save): export again") from None
    prefix = names[0].split("/")[0] + "/" if names else ""
    if len(set(names)) != len(names) or sorted(names) != sorted(prefix + r for r in records):
        raise refuse("its zip directory lists entries twice, or entries torch would not read")
    if other := [r for r in records if not PT2_ENTRIES.match(r)]:
        raise refuse(f"it holds {other[0]!r}")

    def record(name, parse=json.loads):
        try:
            return parse(reader.get_record(name))
        except Exception:  # noqa: BLE001 -- a missing or unparsable entry
            raise refuse(f"{name} is missing or unreadable") from None

    weights, records = record("data/weights/model_weights_config.json"), set(records)
    weights = weights.get("config") if isinstance(weights, dict) else None
    if not isinstance(weights, dict) or not all(
            isinstance(entry, dict) and entry.get("use_pickle") is False and isinstance(entry.get("tensor_meta"), dict)
            and f"data/weights/{entry.get('path_name')}" in records and PT2_NAME.match(fqn)
            for fqn, entry in weights.items()):
        raise refuse("a weight is stored as a pickle (use_pickle) or is not a plain tensor")
    if record("data/constants/model_constants_config.json") != {"config": {}}:
        raise refuse("it holds constants (pickled objects or tensors) besides the weights")
    sample = record("data/sample_inputs/model.pt", lambda b: torch.load(io.BytesIO(b), weights_only=True))
    if not (isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], tuple) and len(sample[0]) == 1
            and isinstance(sample[0][0], torch.Tensor) and sample[1] == {}):
        raise refuse("its sample input is not one tensor")
    program = record("models/model.json")
    problem = pt2_program_problem(program)
    if problem:
        raise refuse(problem)
    graph = program["graph_module"]["graph"]

    def shape(name):
        return [size.get("as_int") if type(size.get("as_int")) is int else None
                for size in graph["tensor_values"][name]["sizes"]]

    user_input, user_output = pt2_user_tensors(program)
    try:
        dims = graph["tensor_values"][user_input]["sizes"]
        symbol = PT2_SYMBOL.match(dims[0]["as_expr"]["expr_str"]) if "as_expr" in dims[0] else None
        limit = program["range_constraints"][symbol.group(1)]["max_val"] if symbol else None
        return shape(user_input), shape(user_output), limit if type(limit) is int and limit >= 1 else None
    except (TypeError, KeyError, IndexError, AttributeError):
        raise refuse("the sizes of its input and output are not given") from None


def pt2_program_problem(program):
    """What in models/model.json of a .pt2 could run code or reach generated code; None if nothing."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict) \
            or not isinstance(program["graph_module"].get("graph"), dict):
        return "models/model.json is not a program"
    if program.get("guards_code"):
        return "it holds guard code, which torch would compile and run"
    graph = program["graph_module"]["graph"]
    if graph.get("custom_obj_values"):
        return "it holds custom objects"
    for part in ("inputs", "outputs"):
        values = graph.get(part)
        if not (isinstance(values, list) and values and all(isinstance(v, dict) and list(v) == ["as_tensor"]
                                                            for v in values)):
            return f"its graph {part} are not tensors"
    if pt2_user_tensors(program) is None:
        return "it does not take one tensor and give one"
    for node in graph.get("nodes") or []:
        target = node.get("target") if isinstance(node, dict) else None
        if not (isinstance(target, str) and re.fullmatch(r"torch\.ops\.aten\.[a-z0-9_]+\.[A-Za-z0-9_]+", target)
                and isinstance(aten_operator(target), torch._ops.OpOverload)):
            return f"its graph calls {str(target)[:80]!r}, not an aten operator"
        for arg in node.get("inputs") or []:
            if not (isinstance(arg, dict) and isinstance(arg.get("arg"), dict) and len(arg["arg"]) == 1
                    and set(arg["arg"]) <= PT2_ARGS):
                return f"an argument of {target} is not a tensor, number or name"
        if not (isinstance(node.get("metadata", {}), dict) and set(node.get("metadata", {})) <= set(PT2_METADATA)):
            return "a node carries metadata other than where it came from"

    def text_problem(value, key):
        if key in PT2_METADATA:  # lines of Python source comments: a \r would end one and start code
            return "control characters in its metadata" if cli.CONTROL.search(value.replace("\n", "")) else None
        if key == "expr_str":
            return None if PT2_SYMBOL.match(value) else f"the size {value[:60]!r}, which sympy would evaluate"
        if key in ("in_spec", "out_spec"):
            try:
                specs, nodes = json.loads(value), []
                nodes.append(specs[1])
                while nodes:
                    spec = nodes.pop()
                    if spec["type"] not in PT2_SPEC_TYPES or spec["context"] not in (None, "null", "[]"):
                        return f"the call signature {value[:60]!r}"
                    nodes += spec["children_spec"]
            except (ValueError, TypeError, KeyError, IndexError):
                return f"the call signature {value[:60]!r}"
            return None
        if key == "torch_version":
            return None if re.fullmatch(r"[0-9A-Za-z.+]*", value) else "an odd torch version"
        return None if PT2_NAME.match(value) else f"the name {value[:60]!r}"

    stack = [(program, None)]
    while stack:
        value, key = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if not PT2_NAME.match(k):
                    return f"the name {k[:60]!r}"
                stack.append((v, k))
        elif isinstance(value, list):
            stack += [(v, key) for v in value]
        elif isinstance(value, str) and (problem := text_problem(value, key)):
            return problem
    return None


def pt2_user_tensors(program):
    """The names of the program's input and output tensor (the caller's, not the weights), or None."""
    try:
        signature = program["graph_module"]["signature"]
        (user_input,), (user_output,) = ([spec[kind]["arg"]["as_tensor"]["name"] for spec in signature[specs]
                                          if kind in spec]
                                         for specs, kind in (("input_specs", "user_input"),
                                                             ("output_specs", "user_output")))
        return user_input, user_output
    except (TypeError, KeyError, ValueError):  # ValueError: not exactly one of each
        return None


def aten_operator(target):
    """torch.ops.aten.NAME.OVERLOAD, or None for an operator torch does not have."""
    _, _, _, name, overload = target.split(".")
    try:
        return getattr(getattr(torch.ops.aten, name), overload)
    except (AttributeError, RuntimeError):
        return None
