"""Export a trained EfficientNet to run without this repo: a torch.export program (.pt2) or an
ONNX model (.onnx), BatchNorm folded into the convs, in eval mode, taking a float32 NCHW batch of
normalised RGB images and returning logits. Beside it, FILE.json says what a caller needs: class
names, input size, mean and std, resize, crop and interpolation, the variant, the file's sha256.

    python export.py --weights weights/b0-digits/best.pth --format onnx      # -> best.onnx, best.onnx.json
    python export.py --weights best.pth --format pt2 --dynamic-batch --output deploy/b0.pt2
    python export.py --weights imagenet --model b2 --format pt2              # ImageNet B2, written here
    python predict.py photo.jpg --weights best.onnx                          # same top-k as best.pth

ONNX needs `pip install -r requirements-export.txt` (onnx, onnxscript, onnxruntime); pt2 needs
only torch. Both run on a CPU here; a batch of one image unless --dynamic-batch.
"""
import contextlib
import io
import os
import sys

import torch

import cli
import errors
import exported
import model_files
import outputs
import pretrained
from errors import WeightsError
from model import MAX_IMG_SIZE, MIN_IMG_SIZE, VARIANTS, VARIANTS_HELP, title

ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export needs; onnxruntime runs the result


def get_args_parser():
    p = cli.ArgumentParser(description="Export a trained EfficientNet to ONNX or torch.export (.pt2).")
    p.add_argument("--weights", required=True, help="best.pth from train.py, or a torchvision / tutorial state_dict, "
                   "or " + pretrained.NAMES_HELP)
    p.add_argument("--model", default=None, choices=list(VARIANTS),
                   help="variant (default: read from the weights; with --weights imagenet, b0); " + VARIANTS_HELP)
    p.add_argument("--format", default="onnx", choices=["onnx", "pt2"], help="onnx (needs requirements-export.txt) "
                   "or pt2 (torch.export, needs only torch)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side in pixels (default: the crop the model is evaluated at)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: one image per call)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="the exported file (default: beside the weights, e.g. best.onnx); FILE.json goes beside it")
    return p


def missing_onnx_packages():
    import importlib.util
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def sizes(info, img_size):
    """(resize, crop) of the exported input: the checkpoint's own, or scaled to --img-size with its ratio."""
    _, resize = model_files.eval_transform(info, info["variant"])
    crop = info.get("eval_crop") or VARIANTS[info["variant"]].eval_crop
    if img_size is None or img_size == crop:
        return resize, crop
    return round(img_size * resize / crop), img_size


def export_program(model, crop, dynamic_batch):
    """torch.export of `model` for a float32 [batch, 3, crop, crop] input: the graph both formats are written from."""
    example = torch.randn(2 if dynamic_batch else 1, 3, crop, crop)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None  # no upper bound: any batch
    return torch.export.export(model, (example,), dynamic_shapes=shapes)


def save(program, fmt, path):
    """Write the program as .pt2 or .onnx, whole or not at all (outputs.atomic_write); returns
    the ONNX opset (None for pt2)."""
    if fmt == "pt2":
        # whole in memory first: torch's zip writer aborts the process ("terminate called ...
        # c10::Error") when a write to the file fails, a full disk for one; a Python write raises OSError
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        outputs.atomic_write(path, lambda f: f.write(buffer.getbuffer()))
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["images"], output_names=["logits"],
                                         verbose=False)
    outputs.atomic_write(path, lambda f: f.write(onnx_program.model_proto.SerializeToString()))
    return next(o.version for o in onnx_program.model_proto.opset_import if o.domain in ("", "ai.onnx"))


def main(args):
    if args.format == "onnx" and (missing := missing_onnx_packages()):
        print(f"error: --format onnx needs {', '.join(missing)}: pip install -r requirements-export.txt "
              "(or use --format pt2, which needs only torch)", file=sys.stderr)
        return 2
    if args.img_size is not None and not MIN_IMG_SIZE <= args.img_size <= MAX_IMG_SIZE:
        raise errors.UsageError(f"--img-size must be between {MIN_IMG_SIZE} and {MAX_IMG_SIZE} (got {args.img_size})")
    if (weights := pretrained.resolve(args.weights, args.model)) != args.weights and args.output is None:
        args.output = os.path.basename(os.path.splitext(weights)[0]) + "." + args.format  # here, not in torch's cache
    args.weights = weights
    output = args.output or os.path.splitext(args.weights)[0] + "." + args.format
    if not output.endswith("." + args.format):
        raise errors.UsageError(f"--output {output}: a {args.format} file should end in .{args.format}")
    outputs.check_output_file(output, "--output")
    outputs.check_output_file(output + ".json", "--output's sidecar")
    beside = os.path.join(os.path.dirname(os.path.abspath(args.weights)), "class_indices.json")
    outputs.check_distinct([("--output", output), ("--output's sidecar", output + ".json")],
                           [("the --weights file", args.weights),
                            ("the class_indices.json beside the weights", beside)])
    model, info, _, _ = model_files.load_model(args.weights, args.model)
    if info.get("source") == "export":
        raise WeightsError(f"{args.weights} is an exported file already; export from the best.pth it came from")
    model = model.to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = model_files.class_names(info, args.weights, None, info["num_classes"])
    resize, crop = sizes(info, args.img_size)
    program = export_program(model, crop, args.dynamic_batch)
    with outputs.reported_as("--output", output):
        opset = save(program, args.format, output)
        meta = exported.write_sidecar(output, info, names, resize, crop, args.format, args.dynamic_batch, opset)
    size = os.path.getsize(output) / 2**20
    print(cli.printable(f"wrote {output} ({size:.1f} MiB, {title(info['variant'])}, {len(names)} "
                        f"classes, input {meta['input']['shape']}{f', ONNX opset {opset}' if opset else ''}) and "
                        f"{output}.json"))
    return 0


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.quiet_warnings()
    try:
        sys.exit(main(args))
    except (errors.UsageError, WeightsError) as e:
        print(f"error: {cli.printable(str(e))}", file=sys.stderr)
        sys.exit(2)
    except errors.WriteError as e:
        print(f"error: {cli.printable(str(e))}", file=sys.stderr)
        sys.exit(1)
