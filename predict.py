"""Classify images with a trained EfficientNet; everything but the images comes from the weights file.

    python predict.py photo.jpg --weights weights/b0-flower_photos/best.pth
    python predict.py data/digits/3 --weights weights/b0-digits/best.pth --topk 3
    python predict.py "shots/**/*.jpg" --weights efficientnet_b0_rwightman-7f5810bc.pth --json
    python predict.py photo.jpg --weights imagenet --model b3 --topk 5   # ImageNet classes
    python predict.py my_photos --weights best.pth --csv predictions.csv --plot predictions.png

PATH may be image files, folders (searched recursively) or glob patterns. Weights are this repo's
checkpoints (variant, classes and preprocessing are inside), or raw state_dicts: torchvision's
official files (ImageNet class names and torchvision's own eval transform) or the tutorial's
(class names from class_indices.json beside the file, or --class-indices).
"""
import collections
import copy
import difflib
import glob
import json
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import cli
import errors
import model_files
import outputs
import pretrained
import reports
import runtime
import transforms
import utils
from errors import WeightsError
from inference import CPUInference
from model import VARIANTS, VARIANTS_HELP, EfficientNet
from my_dataset import load_rgb


PLOT_LIMIT = 256  # 32 rows of 8: beyond that the grid takes minutes and gigabytes and no viewer shows it whole


def get_args_parser():
    p = cli.ArgumentParser(description="Predict the class of images with an EfficientNet.",
                           usage="%(prog)s PATH [PATH ...] --weights FILE|imagenet [--topk N] [--json] "
                                 "[more flags, below]")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    add_model_flags(p)
    p.add_argument("--topk", type=int, default=1, help="how many classes to show per image")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the predictions to this CSV file")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the images with their top class")
    p.add_argument("--plot-limit", type=int, default=64, metavar="N",
                   help=f"draw at most the first N images (at most {PLOT_LIMIT})")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or cuda:1")
    p.add_argument("--workers", type=int, default=runtime.default_workers(), help="image decoding processes")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image's probabilities with its mirror image's "
                        "(left off for a model trained with --no-hflip)")
    p.add_argument("--cam", default=None, metavar="OUT_DIR",
                   help="also write a class-activation map (Grad-CAM) per image into this folder, as PNGs")
    p.add_argument("--cam-class", default=None, metavar="NAME",
                   help="with --cam: the class whose map to draw (default: each image's top class)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 on GPUs without native bf16): faster "
                   "on GPUs; on a CPU no faster than fp32's fused oneDNN path. Probabilities differ from fp32's by "
                   "up to 0.02, and the top class of a near tie can change")
    return p


def add_model_flags(p):
    """--weights, --model and --class-indices: what to predict with (serve.py's too)."""
    p.add_argument("--weights", metavar="FILE|imagenet",
                   help="(required) best.pth from train.py, its export (.onnx, .pt2), a torchvision or tutorial "
                        "state_dict, or " + pretrained.NAMES_HELP)
    p.add_argument("--model", default=None, choices=list(VARIANTS),
                   help="variant (default: read from the weights; with --weights imagenet, b0); " + VARIANTS_HELP)
    p.add_argument("--class-indices", default=None,
                   help="class_indices.json with the class names (default: from the checkpoint, or beside it)")


def expand_paths(patterns):
    """(image paths, [(path or pattern, error)]): folders are searched recursively, globs expanded;
    sorted. Only regular files (or links to them) are ever opened: a FIFO would block forever."""
    found, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = utils.list_images(pattern, problems)
        elif os.path.isfile(pattern):
            matches = [pattern]
        elif os.path.exists(pattern):
            problems.append((pattern, "not a regular file (a FIFO, socket or device); not opened"))
            continue
        else:  # a folder that the pattern matches is searched like a folder given by name
            matches = []
            for match in sorted(glob.glob(pattern, recursive=True)):
                if os.path.isdir(match):
                    matches += utils.list_images(match, problems)
                elif os.path.isfile(match):
                    matches.append(match)
        if matches:
            found += matches
        elif os.path.isdir(pattern):
            problems.append((pattern, f"no images in this folder (looked for {' '.join(utils.IMG_EXTENSIONS)})"))
        else:
            problems.append((pattern, "no such file" if not glob.has_magic(pattern) else "no file matches"))
    return list(dict.fromkeys(found)), list(dict.fromkeys(problems))


class ImagePaths(Dataset):
    """(index, tensor or None, error message) for each path: a bad file is reported, not raised."""

    def __init__(self, paths, transform, draft_size):
        self.paths, self.transform, self.draft_size = paths, transform, draft_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform(load_rgb(self.paths[i], self.draft_size)), None
        except Exception as e:
            return i, None, f"cannot read image: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    @staticmethod
    def collate(batch):
        good = [b for b in batch if b[1] is not None]
        images = torch.stack([b[1] for b in good]) if good else None
        return [b[0] for b in good], images, [(b[0], b[2]) for b in batch if b[1] is None]


def predict(model, loader, device, topk, amp=False, tta=False, normalize=None):
    """Yields (index, probabilities of the top k, their class indices) or (index, error, None).
    tta: the mean of the probabilities of each image and its mirror image. `normalize` (the eval
    transform's) turns the loader's uint8 images into floats on `device`."""
    dtype = runtime.half_dtype(device)  # fp16 needs no grad scaler without gradients
    with torch.inference_mode():
        for indices, images, failures in loader:
            for i, error in failures:
                yield i, error, None
            if images is None:
                continue
            images = images.to(device, memory_format=torch.channels_last)
            images = images if normalize is None else normalize(images)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                probs = utils.mirror_averaged(model, images) if tta else model(images).float().softmax(1)
            top = probs.topk(topk)
            for i, p, c in zip(indices, top.values.tolist(), top.indices.tolist()):
                yield i, p, c


def fast_path(model, device, amp):
    """The model predict runs: on a CPU in fp32, CPUInference where PyTorch has oneDNN (1.3x at
    224 px, answers the same to fp32 rounding), made from `model` itself."""
    if device.type == "cpu" and not amp and isinstance(model, EfficientNet) and CPUInference.available():
        return CPUInference(model)
    return model


def computed_in(amp, device, info, weights, model):
    """The words that say how predict ran, for the summary line."""
    if info.get("source") == "export":
        return "ONNX Runtime" if weights.lower().endswith(".onnx") else "the exported program"
    if not amp:
        return "fp32, fused oneDNN convs" if isinstance(model, CPUInference) else "fp32"
    return f"{'fp16' if device.type == 'cuda' and not runtime.native_bf16(device) else 'bf16'} autocast (--amp)"


def cam_class_index(name, names):
    """The class index of --cam-class NAME (None: each image's top class); a usage error if unknown."""
    if name is None:
        return None
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        raise errors.UsageError(f"--cam-class {name} is not a class of these weights: "
                                + (f"did you mean {', '.join(near)}?" if near else f"they are {', '.join(names[:8])}"
                                   + (" ..." if len(names) > 8 else "")))
    return names.index(name)


def grad_cam(model, x, target=None):
    """Grad-CAM (Selvaraju et al., 2017) for one image x [1, 3, H, W]: the last conv block's maps A_k
    weighted by the spatial mean of d logit / d A_k, summed, negatives cut, scaled to [0, 1].
    Returns (map [h, w] at the block's resolution, logits [classes], the class mapped: `target`, or
    the top class)."""
    layer = model.features[-1]
    seen = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.update(maps=output))
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_())[0]  # a graph even where the weights need no gradient
            target = int(logits.argmax()) if target is None else target
            grad, = torch.autograd.grad(logits[target], seen["maps"])
    finally:
        handle.remove()
    cam = (grad.mean((2, 3), keepdim=True) * seen["maps"]).sum(1)[0].relu().detach()
    return cam / cam.max() if cam.max() > 0 else cam, logits.detach(), target


def cam_file_names(paths):
    """The --cam file of each image: NAME_cam.png, NAME_cam-2.png for a second NAME in another folder;
    a long NAME is cut so that the file name keeps within the 255 bytes a file system allows."""
    names, used = [], set()
    for path in paths:
        stem, n = os.fsencode(os.path.splitext(os.path.basename(path))[0]), 1
        while True:
            suffix = b"_cam.png" if n == 1 else f"_cam-{n}.png".encode()
            name = os.fsdecode(stem[:255 - len(suffix)] + suffix)
            if name not in used:
                break
            n += 1
        used.add(name)
        names.append(name)
    return names


def check_cam_folder(folder):
    """Fail before predicting anything when the --cam folder cannot be made or written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise errors.UsageError(f"--cam {folder} is a file: give a folder for the maps, e.g. --cam cams")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the folder is made with its parents: the first that exists decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise errors.UsageError(f"--cam {folder}: {existing} is not a writable folder; choose another")


def write_cams(model, dataset, device, names, topk, target, folder, files):
    """One PNG per readable image in `folder`, named `files` (cam_file_names): the image as the model
    sees it (resized and cropped) and the same with the Grad-CAM of `target` (None: the top class)
    over it, the top-k in the title."""
    plt = reports.pyplot()
    os.makedirs(folder, exist_ok=True)
    mean, std = dataset.transform.mean, dataset.transform.std
    written = 0
    for i in range(len(dataset)):
        _, x, error = dataset[i]
        if x is None:
            continue
        x = dataset.transform.normalize(x[None])[0]
        cam, logits, cls = grad_cam(model, x[None].to(device, memory_format=torch.channels_last), target)
        image = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        heat = torch.nn.functional.interpolate(cam[None, None].float().cpu(), size=x.shape[1:], mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
        probs = logits.float().softmax(0)
        top = probs.topk(topk)
        fig, (left, right) = plt.subplots(1, 2, figsize=(7.8, 4.0))
        left.imshow(image)
        right.imshow(image)
        shown = right.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04, label="evidence for the class (1 = this image's most)")
        for ax in (left, right):
            ax.axis("off")
        left.set_title("\n".join(f"{cli.printable(names[c])[:28]} {p:.3f}"
                                 for p, c in zip(top.values.tolist(), top.indices.tolist())), fontsize=8)
        right.set_title(f"Grad-CAM: {cli.printable(names[cls])[:28]} ({probs[cls]:.3f})", fontsize=8)
        fig.suptitle(cli.printable(dataset.paths[i])[-70:], fontsize=8)
        reports.save_figure(fig, os.path.join(folder, files[i]))
        written += 1
    return written


def plot_predictions(results, path, limit=64):
    """A grid of the first `limit` predicted images with their top class; returns how many."""
    shown = [r for r in results if "topk" in r][:limit]
    if shown:
        reports.plot_tiles([(r["path"], f"{cli.printable(r['topk'][0]['class'])[:18]} ({r['topk'][0]['prob']:.2f})")
                            for r in shown], path)
    return len(shown)


def input_files(weights, class_indices, paths):
    """(what, path) of every file predict.py reads: no output may be one of them."""
    beside = os.path.join(os.path.dirname(os.path.abspath(weights)), "class_indices.json")
    return ([("the --weights file", weights), ("the sidecar of the --weights file", weights + ".json"),
             ("the class_indices.json beside the weights", beside)]
            + ([("the --class-indices file", class_indices)] if class_indices else [])
            + [(f"the image {cli.printable(path)}", path) for path in paths])


def newest_run_weights():
    """The best.pth of the newest run under ./weights, or None: a suggestion for a missing --weights."""
    runs = glob.glob(os.path.join("weights", "*", "best.pth"))
    return max(runs, key=os.path.getmtime) if runs else None


def top_classes(probs, classes, names):
    """The "topk" of a result, best first: each class's index, name and probability to 6 decimals
    (predict.py --json's numbers, and serve.py's)."""
    return [{"index": c, "class": names[c], "prob": round(p, 6)} for p, c in zip(probs, classes)]


def main(args):
    if args.weights is None:
        newest = newest_run_weights()
        raise errors.UsageError("--weights is required: the weights to predict with, e.g. "
                                + (f"--weights {newest} (the newest run here)" if newest else
                                   "--weights weights/b0-digits/best.pth from a train.py run"))
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path:
            outputs.check_output_file(path, flag)
    if args.cam:
        check_cam_folder(args.cam)
    device = runtime.choose_device(args.device)
    if device.type == "cpu":
        runtime.keep_freed_memory()
    runtime.configure_cuda(device, train=False)
    args.weights = pretrained.resolve(args.weights, args.model)  # a name (imagenet): the file in torch's cache
    paths, missing = expand_paths(args.paths)
    cam_files = cam_file_names(paths) if args.cam else []
    outputs.check_distinct([(flag, path) for flag, path in (("--csv", args.csv), ("--plot", args.plot)) if path]
                           + [("--cam", os.path.join(args.cam, name)) for name in cam_files],
                           input_files(args.weights, args.class_indices, paths))
    model, info, transform, resize = model_files.load_model(args.weights, args.model, device)
    names = model_files.class_names(info, args.weights, args.class_indices, info["num_classes"])
    if info.get("ema"):
        print(f"note: {args.weights} is a last.pth: predicting with its averaged (EMA) weights, the ones its "
              "validation scored", file=sys.stderr)
    topk = min(args.topk, len(names))
    dataset = ImagePaths(paths, transform, draft_size=transforms.eval_draft_size(resize))
    workers = runtime.usable_workers(args.workers) if len(paths) > args.batch_size else 0
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                        collate_fn=ImagePaths.collate, pin_memory=device.type == "cuda",
                        worker_init_fn=runtime.init_loader_worker)

    if args.cam and info.get("source") == "export":
        raise errors.UsageError("--cam needs the best.pth the export came from: an exported file has no gradients")
    cam_class = cam_class_index(args.cam_class, names) if args.cam else None
    tta = args.tta and not (info.get("args") or {}).get("no_hflip", False)
    if args.tta and not tta:
        print("note: --tta left off: this model was trained with --no-hflip, so mirror images may be other "
              "classes", file=sys.stderr)

    # --cam's gradients need the model as it is
    runner = fast_path(copy.deepcopy(model) if args.cam else model, device, args.amp)

    def results():
        yield from ({"path": p, "error": e} for p, e in missing)
        for i, probs, classes in predict(runner, loader, device, topk, args.amp, tta, transform.normalize):
            if classes is None:
                yield {"path": paths[i], "error": probs}
            else:
                yield {"path": paths[i], "topk": top_classes(probs, classes, names)}

    tally, total = Tally(args.plot_limit if args.plot else 0), len(paths) + len(missing)
    if args.csv:  # rows go to the file as they come; it replaces the old one when the last is written
        with outputs.reported_as("--csv", args.csv):
            outputs.atomic_write(args.csv, lambda f: report(results(), tally, args, topk, f, total))
    else:
        report(results(), tally, args, topk, None, total)
    wrote = [f"{args.csv} ({tally.total} rows)"] if args.csv else []
    if args.cam:
        with outputs.reported_as("--cam", args.cam):
            drawn = write_cams(model, dataset, device, names, topk, cam_class, args.cam, cam_files)
        wrote += [f"{drawn} class-activation map{'s' if drawn != 1 else ''} to {args.cam}"]
    if args.plot:
        with outputs.reported_as("--plot", args.plot):
            drawn = plot_predictions(tally.shown, args.plot, args.plot_limit)
        predicted = sum(tally.counts.values())
        wrote += [f"{args.plot} ({'all' if drawn == predicted else f'first {drawn} of'} {predicted} images)"] if drawn \
            else []
    if tally.total > 1:
        print(f"{tally.summary()}; {computed_in(args.amp, device, info, args.weights, runner)}", file=sys.stderr)
    if wrote:
        print(cli.printable(f"wrote {', '.join(wrote)}"), file=sys.stderr)
    return 1 if tally.failed else 0


class Tally:
    """What the end of a run needs to know, kept as the results stream past: counts per class, the
    failures, and the first `keep` predicted results for --plot; never a list of all of them."""

    def __init__(self, keep):
        self.counts, self.failed, self.total, self.keep, self.shown = collections.Counter(), 0, 0, keep, []

    def add(self, result):
        self.total += 1
        if "error" in result:
            self.failed += 1
            return
        self.counts[result["topk"][0]["class"]] += 1
        if len(self.shown) < self.keep:
            self.shown.append(result)

    def summary(self):
        """One line for a run over many images: how many, which classes, how many failed."""
        top = ", ".join(f"{cli.printable(name)}: {n}" for name, n in self.counts.most_common(5))
        more = f", {len(self.counts) - 5} more" if len(self.counts) > 5 else ""
        classes = f"{len(self.counts)} class{'es' if len(self.counts) != 1 else ''}"
        return (f"{self.total} inputs: {sum(self.counts.values())} predicted as {classes} ({top}{more})"
                + (f", {self.failed} could not be read" if self.failed else ""))


def report(results, tally, args, topk, csv_file, total):
    """Each result to the terminal (or --json) and to the open --csv file as it comes, with a
    progress bar and the time left on a terminal when there are many images."""
    bar = tqdm(total=total, unit="img", desc="predict", leave=False, dynamic_ncols=True,
               disable=not (total > args.batch_size and cli.progress_bars()))
    if csv_file is not None:
        csv_file.write(csv_header(topk).encode("utf-8"))
    for result in results:
        tally.add(result)
        show(result, args, say if bar.disable else bar.write)
        bar.update()
        if csv_file is not None:
            csv_file.write(csv_row(result, topk).encode("utf-8", "surrogateescape"))
    bar.close()


def say(text, file=sys.stdout):
    print(text, file=file, flush=True)  # each line out as it comes, also into a pipe


def show(result, args, say=say):
    if args.json:
        line = json.dumps(result, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8: \u escapes keep it valid JSON
            line = json.dumps(result)
        say(line)
    elif "error" in result:  # names as the terminal can show them: no escape sequence, no line of their own
        say(f"{cli.printable(result['path'])}: error: {cli.printable(result['error'])}", file=sys.stderr)
    elif len(result["topk"]) == 1:
        top = result["topk"][0]
        say(f"{cli.printable(result['path'])}: {cli.printable(top['class'])} ({top['prob']:.3f})")
    else:
        say(cli.printable(result["path"]) + "".join(f"\n  {rank}. {cli.printable(t['class']):<30} {t['prob']:.4f}"
                                                    for rank, t in enumerate(result["topk"], 1)))


def csv_header(topk):
    return ",".join(["path"] + [f"{field}{k}" for k in range(1, topk + 1) for field in ("class", "prob")]
                    + ["error"]) + "\n"


def csv_row(result, topk):
    cells = [reports.csv_field(result["path"])]
    for t in result.get("topk", [{"class": "", "prob": ""}] * topk):
        cells += [reports.csv_field(t["class"]), str(t["prob"])]
    return ",".join(cells + [reports.csv_field(result.get("error", ""))]) + "\n"


def on_sigterm(signum, frame):
    runtime.stop_watching_workers()
    raise KeyboardInterrupt  # as Ctrl-C: an output being written is removed, not left half-made


def check_args(parser, args):
    if args.topk < 1 or args.batch_size < 1 or args.plot_limit < 1:
        parser.error("--topk, --batch-size and --plot-limit must be at least 1")
    if args.plot_limit > PLOT_LIMIT:
        parser.error(f"--plot-limit is at most {PLOT_LIMIT} (got {args.plot_limit}): a larger grid takes minutes and "
                     "gigabytes to draw; --csv lists every image")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more (got {args.workers})")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    cli.speak_any_file_name()
    cli.quiet_warnings()
    try:
        sys.exit(main(args))
    except (errors.UsageError, WeightsError) as e:
        print(f"error: {cli.printable(str(e))}", file=sys.stderr)
        sys.exit(2)
    except errors.WriteError as e:
        print(f"error: {cli.printable(str(e))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the output went into `head` or similar, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
