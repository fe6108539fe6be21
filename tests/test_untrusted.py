"""Files from someone else and outputs in odd places: an exported model that would run code, names
that would drive the terminal, outputs that would overwrite an input or replace a pipe, a full
disk, a FIFO where a file was expected, and a signal in the middle of a write."""
import argparse
import csv
import hashlib
import io
import json
import operator
import os
import resource
import signal
import subprocess
import sys
import zipfile

import pytest
import torch
from PIL import Image

import checkpoint
import cli
import export
import errors
import exported as exported_files  # the fixture below is named exported
import model_files
import outputs
import predict
import reports
from errors import WeightsError
from conftest import ROOT, copy_digits, run_script
from inference import fuse_bn
from model import VARIANTS, create_model
from weight_files import read_weights

CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(a B0 exported with --dynamic-batch at 32 px with its sidecar, a folder of 4 images)."""
    folder = tmp_path_factory.mktemp("exported")
    model = fuse_bn(create_model("b0", len(CLASSES))).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    path = str(folder / "m.pt2")
    export.save(export.export_program(model, 32, dynamic_batch=True), "pt2", path)
    exported_files.write_sidecar(path, {"variant": "b0"}, CLASSES, 36, 32, "pt2", True, None)
    return path, copy_digits(folder / "images", classes=("0", "1"), per_class=2)


def rewrite_pt2(src, dst, change):
    """A copy of the .pt2 `src` at `dst` with its entries ({name in the archive: bytes}) changed by
    `change`, and its sidecar with the sha256 of the copy: whoever ships a file ships its .json."""
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        prefix = names[0].split("/")[0] + "/"
        entries = {name[len(prefix):]: z.read(name) for name in names}
    change(entries)
    dst = str(dst)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(prefix + name, data)
    with open(dst, "wb") as f:
        f.write(buffer.getvalue())
    with open(src + ".json") as f:
        side = json.load(f)
    side["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    with open(dst + ".json", "w") as f:
        json.dump(side, f)
    return dst


class CreatesFile:
    """Unpickled, creates the file `path` (any code could run here)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class Payload:
    """Unpickled, creates `path` and then stands for `value`: the load goes on as if nothing happened."""

    def __init__(self, path, value):
        self.path, self.value = path, value

    def __reduce__(self):
        return operator.getitem, ((CreatesFile(self.path), self.value), 1)


def pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pickled_weight(marker):
    """A change for rewrite_pt2: the first weight stored as a pickle (use_pickle) that creates `marker`."""
    def change(entries):
        config = json.loads(entries["data/weights/model_weights_config.json"])
        fqn, entry = next(iter(config["config"].items()))
        entry["use_pickle"] = True
        sizes = [size["as_int"] for size in entry["tensor_meta"]["sizes"]]
        raw = bytearray(entries["data/weights/" + entry["path_name"]])
        weight = torch.frombuffer(raw, dtype=torch.float32)[:torch.Size(sizes).numel()].reshape(sizes).clone()
        entries["data/weights/" + entry["path_name"]] = pickled(Payload(marker, torch.nn.Parameter(weight, False)))
        entries["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    return change


def test_a_pt2_with_a_pickled_weight_is_refused_before_it_runs_code(exported, tmp_path):
    """Before: the pickle ran (the marker file appeared) and predict.py printed its results, exit 0."""
    path, images = exported
    marker = tmp_path / "marker"
    evil = rewrite_pt2(path, tmp_path / "evil.pt2", pickled_weight(str(marker)))
    result = run_script("predict.py", images, "--weights", evil, check=False)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "refusing to load" in result.stderr and "pickle" in result.stderr
    assert not marker.exists()


def sample_inputs_that_run_code(marker):
    def change(entries):
        entries["data/sample_inputs/model.pt"] = pickled(Payload(marker, ((torch.zeros(2, 3, 32, 32),), {})))
    return change


def guard_code(marker):
    def change(entries):
        program = json.loads(entries["models/model.json"])
        program["guards_code"] = [f"open({marker!r}, 'w') is not None"]
        entries["models/model.json"] = json.dumps(program).encode()
    return change


def size_expression(marker):
    def change(entries):
        text = entries["models/model.json"].decode()
        symbol = text[text.index("Symbol('"):text.index(")", text.index("Symbol('")) + 1]
        entries["models/model.json"] = text.replace(symbol, f"{symbol} + 0*len(str(open({marker!r}, 'w')))",
                                                    1).encode()
    return change


@pytest.mark.parametrize("change", [sample_inputs_that_run_code, guard_code, size_expression])
def test_every_way_a_pt2_runs_code_on_loading_is_refused(exported, tmp_path, change):
    """torch.export.load unpickles sample inputs that weights_only refuses, compiles the stored guard
    code and evaluates each size expression with sympy. Before: each created the marker file."""
    path, _ = exported
    marker = tmp_path / "marker"
    evil = rewrite_pt2(path, tmp_path / "evil.pt2", change(str(marker)))
    with pytest.raises(WeightsError, match="refusing to load"):
        exported_files.ExportedModel(evil, True, torch.device("cpu"))
    assert not marker.exists()


def test_an_exported_model_takes_any_batch(exported, tmp_path):
    """export.py sets no upper bound on the batch; a .pt2 from before, which had one (4,096), is
    called with batches no larger. Before: the bound was 4,096 and a larger batch failed with
    "Guard failed"."""
    path, _ = exported
    with open(path, "rb") as f:
        assert exported_files.check_pt2(f.read(), path) == ([None, 3, 32, 32], [None, 3], None)

    def bound_of_2(entries):
        program = json.loads(entries["models/model.json"])
        (limits,) = program["range_constraints"].values()
        limits["max_val"] = 2
        entries["models/model.json"] = json.dumps(program).encode()

    bounded = exported_files.ExportedModel(rewrite_pt2(path, tmp_path / "old.pt2", bound_of_2), True, torch.device("cpu"))
    x = torch.randn(5, 3, 32, 32)
    expected = exported_files.ExportedModel(path, True, torch.device("cpu"))(x)
    assert torch.allclose(bounded(x), expected, atol=1e-5)


def test_the_sidecar_must_describe_the_model(exported, tmp_path):
    """A sidecar that names 2 or 5 classes (and says so in output.shape) for a model with 3
    outputs. Before: 2 names was an IndexError traceback, 5 a silent mislabel."""
    path, _ = exported
    for names in (["a", "b"], ["a", "b", "c", "d", "e"]):
        copy = rewrite_pt2(path, tmp_path / "m.pt2", lambda entries: None)
        with open(copy + ".json") as f:
            side = json.load(f)
        side["classes"], side["output"]["shape"] = names, ["batch", len(names)]
        with open(copy + ".json", "w") as f:
            json.dump(side, f)
        with pytest.raises(WeightsError, match=r"gives \[None, 3\]"):
            exported_files.load_exported(copy, torch.device("cpu"))


@pytest.mark.parametrize("change, words", [
    (lambda side: [side], '"the file" must be a JSON object'),
    (lambda side: {k: v for k, v in side.items() if k != "variant"}, '"variant" must be'),
    (lambda side: dict(side, variant="b9"), '"variant" must be'),
    (lambda side: dict(side, classes="abc"), '"classes" must be'),
    (lambda side: dict(side, classes=["a", "b"]), '"output.shape" must be'),
    (lambda side: dict(side, std=[0, 0, 0]), '"std" must be 3 numbers above 0'),
    (lambda side: dict(side, resize=60000), '"resize" must be'),
])
def test_sidecar_fields_are_checked(exported, tmp_path, change, words):
    """Each field a mislabel, a traceback, NaN or a huge allocation would come from (these checks
    were in place; this keeps them)."""
    path, _ = exported
    with open(path + ".json") as f:
        side = change(json.load(f))
    (tmp_path / "m.pt2").write_bytes(b"")
    (tmp_path / "m.pt2.json").write_text(json.dumps(side))
    with pytest.raises(WeightsError, match=words):
        exported_files.read_sidecar(str(tmp_path / "m.pt2"))


def test_a_class_name_that_is_not_utf8_round_trips_through_the_sidecar(tmp_path):
    """Before: the sidecar held the raw byte, was not UTF-8, and predict.py refused it."""
    names = ["caf\udce9", "ok"]  # a folder named b"caf\xe9": Latin-1 on a UTF-8 system
    (tmp_path / "m.onnx").write_bytes(b"model")
    exported_files.write_sidecar(str(tmp_path / "m.onnx"), {"variant": "b0"}, names, 256, 224, "onnx", False, 18)
    (tmp_path / "m.onnx.json").read_bytes().decode("utf-8")
    assert exported_files.read_sidecar(str(tmp_path / "m.onnx"))["classes"] == names


# ---- checkpoint meta and class lists ------------------------------------------------------------

def test_checkpoint_meta_is_checked_field_by_field():
    """Before: each of these went through; a std of 0 gave NaN probabilities, a resize of 60,000
    px gigabytes per image, "abc" three one-letter class names."""
    good = checkpoint.make_meta(argparse.Namespace(img_size=32, model="b0"), ["a", "b", "c"], VARIANTS["b0"], 1e-3)
    assert checkpoint.read_meta({"meta": good})["classes"] == ["a", "b", "c"]
    for field, value, words in [("classes", "abc", "classes"), ("std", [0.0, 0.0, 0.0], "std"),
                                ("std", [float("nan")] * 3, "std"), ("eval_resize", 60000, "eval_resize"),
                                ("eval_crop", 8, "eval_crop"), ("interpolation", "lanczos", "interpolation"),
                                ("mean", [0.5], "mean"), ("args", ["--lr"], "args"), ("bn_eps", "x", "bn_eps")]:
        with pytest.raises(WeightsError, match=f'meta\\["{words}"\\] must be'):
            checkpoint.read_meta({"meta": dict(good, **{field: value})}, "best.pth")
    with pytest.raises(WeightsError, match="eval_resize"):
        checkpoint.read_meta({"meta": {k: v for k, v in good.items() if k != "eval_resize"}}, "best.pth")


def test_checkpoint_class_names_must_match_the_classifier():
    model = create_model("b0", 3)
    meta = {"classes": ["a", "b", "c", "d", "e"]}
    with pytest.raises(WeightsError, match="names 5 classes but its classifier has 3 outputs"):
        read_weights({"model": model.state_dict(), "meta": meta}, where="best.pth")


@pytest.mark.parametrize("text", ['["a", "b"]', '{"0": 5}', '{"0": "a", "1": "b", "x": "c"}', '{}'])
def test_class_indices_must_map_0_to_n_minus_1_to_names(tmp_path, text):
    """Before: a list was a TypeError traceback and a number became a class name."""
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(errors.DataError, match="cannot read class names"):
        model_files.read_class_indices(str(tmp_path / "c.json"))


def test_fifos_given_as_input_files_are_refused_not_waited_on(tmp_path):
    """--weights FIFO (predict.py and train.py), --class-indices FIFO and a FIFO sidecar. Before:
    each blocked forever, here cut off by an alarm after 5 s."""
    fifo = str(tmp_path / "f.pth")
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "m.onnx.json")
    (tmp_path / "m.onnx").write_bytes(b"model")

    def waited(signum, frame):
        raise TimeoutError("blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, waited)
    try:
        for call, error in [(lambda: checkpoint.load_checkpoint(fifo), WeightsError),
                            (lambda: model_files.read_class_indices(fifo), errors.DataError),
                            (lambda: exported_files.read_sidecar(str(tmp_path / "m.onnx")), WeightsError)]:
            signal.alarm(5)
            with pytest.raises(error, match="not a regular file"):
                call()
            signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- names on the terminal and in CSV -----------------------------------------------------------

def test_control_characters_in_names_are_escaped_on_the_terminal():
    """A file name that would retitle the terminal and print a fake result line of its own, a
    class name with a carriage return. Before: printed raw."""
    assert cli.printable("a\x1b[2Jb\nc\rd\x85e\x7f\udcff") == "a\\x1b[2Jb\\nc\\rd\\x85e\\x7f\\xff"
    lines = []

    def say(text, file=None):
        lines.append(text)

    args = predict.get_args_parser().parse_args(["x", "--weights", "w"])
    predict.show({"path": "x\x1b]0;owned\x07.png\nfake.png: cat (1.000)",
                  "topk": [{"index": 0, "class": "dog\r", "prob": 0.9}]}, args, say)
    predict.show({"path": "y\n.png", "error": "cannot read image: y\n.png"}, args, say)
    assert lines == ["x\\x1b]0;owned\\x07.png\\nfake.png: cat (1.000): dog\\r (0.900)",
                     "y\\n.png: error: cannot read image: y\\n.png"]
    args = predict.get_args_parser().parse_args(["x", "--weights", "w", "--json"])
    predict.show({"path": "x\n.png", "topk": [{"index": 0, "class": "dog\r", "prob": 0.9}]}, args, say)
    assert json.loads(lines[-1])["path"] == "x\n.png"  # --json keeps the exact name


def test_a_carriage_return_in_a_name_is_quoted_in_csv(tmp_path):
    """Before: "a\\rb" went out unquoted and readers saw two rows."""
    row = predict.csv_row({"path": "a\rb.png", "topk": [{"class": "c\rd", "prob": 0.5}]}, 1)
    (tmp_path / "p.csv").write_text(predict.csv_header(1) + row, newline="")
    with open(tmp_path / "p.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == [["a\rb.png", "c\rd", "0.5", ""]]
    assert reports.csv_field("x\ry") == '"x\ry"'


# ---- outputs --------------------------------------------------------------------------------------

def predict_args(*flags):
    return predict.get_args_parser().parse_args([str(f) for f in flags])


@pytest.fixture
def photos(tmp_path):
    """A folder of two images and a stand-in weights file (every check here comes before loading it)."""
    folder = copy_digits(tmp_path / "photos", classes=("0",), per_class=2)
    (tmp_path / "best.pth").write_bytes(b"weights")
    return tmp_path, os.path.join(folder, "0")


def test_outputs_that_are_inputs_or_each_other_are_refused_before_any_work(photos, tmp_path):
    """Before: --csv over the weights made best.pth a CSV, --plot over a photo replaced it, and
    --csv and --plot on one path kept only the plot."""
    _, images = photos
    first = os.path.join(images, sorted(os.listdir(images))[0])
    os.symlink(images, tmp_path / "link")
    cases = [(["--csv", tmp_path / "best.pth"], "--csv .* is also the --weights file"),
             (["--plot", tmp_path / "link" / os.path.basename(first)], "is also the image"),
             (["--csv", tmp_path / "out", "--plot", tmp_path / "out"], "--plot .* is also the --csv file"),
             (["--csv", os.path.join(images, ".", "x_cam.png"), "--cam", images], "--cam .* is also the --csv file")]
    (tmp_path / "x.png").write_bytes(b"")
    for flags, words in cases:
        with pytest.raises(errors.UsageError, match=words):
            predict.main(predict_args(tmp_path / "x.png", images, "--weights", tmp_path / "best.pth", *flags))
    assert (tmp_path / "best.pth").read_bytes() == b"weights" and not (tmp_path / "out").exists()


def test_export_refuses_a_sidecar_over_its_weights(tmp_path):
    (tmp_path / "m.pt2.json").write_bytes(b"weights")
    args = export.get_args_parser().parse_args(["--weights", str(tmp_path / "m.pt2.json"), "--format", "pt2",
                                                "--output", str(tmp_path / "m.pt2")])
    with pytest.raises(errors.UsageError, match="sidecar .* is also the --weights file"):
        export.main(args)


def test_a_cam_folder_that_cannot_be_made_is_refused_before_any_work(photos, tmp_path):
    """Before: predicted everything, then a traceback from os.makedirs."""
    _, images = photos
    (tmp_path / "notes").write_text("")
    with pytest.raises(errors.UsageError, match="not a writable folder"):
        predict.main(predict_args(images, "--weights", tmp_path / "best.pth", "--cam", tmp_path / "notes" / "cams"))


def test_cam_file_names_keep_within_255_bytes():
    """Before: a 244-byte image name made a temporary name over 255 bytes, and a longer one a map's name."""
    names = predict.cam_file_names(["a/" + "é" * 126 + ".png", "b/" + "é" * 126 + ".png", "c/x.png", "d/x.png"])
    assert all(len(os.fsencode(name)) <= 255 for name in names) and len(set(names)) == 4
    assert names[2:] == ["x_cam.png", "x_cam-2.png"] and names[1].endswith("_cam-2.png")


def test_a_long_file_name_is_written_whole(tmp_path):
    """The temporary file beside a 250-byte name. Before: its name passed 255 bytes (ENAMETOOLONG)."""
    path = tmp_path / ("n" * 250)
    outputs.atomic_write(str(path), lambda f: f.write(b"data"))
    assert path.read_bytes() == b"data" and os.listdir(tmp_path) == [path.name]


def test_outputs_write_through_links_and_into_fifos(tmp_path):
    """A link stays a link and its target gets the new content; a FIFO stays a FIFO and its reader
    gets the content. Before: both were replaced by a regular file."""
    (tmp_path / "target.csv").write_text("old")
    os.symlink("target.csv", tmp_path / "link.csv")
    outputs.atomic_write(str(tmp_path / "link.csv"), lambda f: f.write(b"new"))
    assert os.path.islink(tmp_path / "link.csv") and (tmp_path / "target.csv").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "target.csv"]

    fifo = str(tmp_path / "pipe.csv")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waiting, as a shell's >(gzip) is
    try:
        outputs.check_output_file(fifo, "--csv")
        outputs.atomic_write(fifo, lambda f: f.write(b"rows\n"))
        assert os.read(reader, 100) == b"rows\n"
    finally:
        os.close(reader)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "pipe.csv", "target.csv"]


def full_disk():
    """In the child: every file it writes may hold 100 bytes at most; a write past that fails
    with EFBIG, as one on a full disk fails with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(exported, tmp_path):
    """predict.py --csv and export.py's .pt2 on a full disk. Before: a traceback, and the pt2
    export aborted the process ("terminate called ... c10::Error", exit 134)."""
    path, images = exported
    cmd = [sys.executable, os.path.join(ROOT, "predict.py"), images, "--weights", path, "--csv", tmp_path / "p.csv"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=full_disk)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot write --csv {tmp_path / 'p.csv'}: File too large"
    code = ("import torch, export\n"
            "program = torch.export.export(torch.nn.Linear(64, 64), (torch.randn(1, 64),))\n"
            f"try:\n    export.save(program, 'pt2', {str(tmp_path / 'm.pt2')!r})\n"
            "except OSError as e:\n    print('OSError', e.strerror)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=full_disk)
    assert (result.returncode, result.stdout) == (0, "OSError File too large\n"), result.stderr[-2000:]
    assert os.listdir(tmp_path) == []


WRAPPER = """import os, runpy, signal, sys
import exported
call = exported.ExportedModel.__call__
def interrupted(self, images):
    os.kill(os.getpid(), signal.{signal})  # as the user does while the --csv file is being written
    return call(self, images)
exported.ExportedModel.__call__ = interrupted
sys.argv = ["predict.py"] + sys.argv[1:]
runpy.run_path("predict.py", run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_writing_the_csv_leaves_nothing_and_says_so(exported, tmp_path, sig):
    """Before: SIGTERM left the .tmp file behind (killed, exit -15); Ctrl-C printed a traceback."""
    path, images = exported
    result = subprocess.run([sys.executable, "-c", WRAPPER.format(signal=sig), images, "--weights", path,
                             "--csv", tmp_path / "p.csv"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_a_glob_that_matches_folders_searches_them(tmp_path):
    """Before: "data/digits/[01]" said "no file matches"."""
    copy_digits(tmp_path, classes=("0", "1", "2"), per_class=2)
    paths, problems = predict.expand_paths([str(tmp_path / "[01]")])
    assert problems == [] and sorted(os.path.basename(os.path.dirname(p)) for p in paths) == ["0", "0", "1", "1"]


def test_plot_limit_has_a_ceiling(capsys):
    """Before: --plot-limit 2400 drew for minutes into a PNG 53,438 px tall."""
    parser = predict.get_args_parser()
    predict.check_args(parser, parser.parse_args(["x", "--plot-limit", "256"]))
    with pytest.raises(SystemExit) as exit:
        predict.check_args(parser, parser.parse_args(["x", "--plot-limit", "2400"]))
    assert exit.value.code == 2 and "--plot-limit is at most 256 (got 2400)" in capsys.readouterr().err


# ---- weights files that torch.load(weights_only=True) opens but that are not what they claim ----

def b0_state_dict():
    return create_model("b0", 3).state_dict()


def changed(key, value):
    return lambda sd: dict(sd, **{key: value})


# (how the file differs from a real B0 state dict, the words of the one-line refusal)
STRANGERS = {
    "a 0-d classifier": (changed("classifier.1.weight", torch.tensor(1.0)),
                         "classifier.1.weight has shape [] where the model's is ['classes', 1280]"),
    "a matrix of the wrong shape": (changed("features.top.0.weight", torch.zeros(1280, 7, 1, 1)),
                                    "features.top.0.weight has shape [1280, 7, 1, 1] where the model's is "
                                    "[1280, 320, 1, 1]"),
    "a key the model has not": (changed("features.top.0.extra", torch.zeros(3)),
                                "it holds features.top.0.extra, which the model has not"),
    "10^12 values over 16 MB (stride 0)": (changed("classifier.1.weight",
                                                   torch.zeros(4_000_000).expand(250_000, 4_000_000)),
                                           "classifier.1.weight is a tensor of 1,000,000,000,000 values"),
    "a sparse tensor": (lambda sd: dict(sd, **{"classifier.1.weight": sd["classifier.1.weight"].to_sparse()}),
                        "classifier.1.weight is a sparse_coo tensor, not a dense one"),
    "a tensor on the meta device": (changed("classifier.1.weight", torch.empty(3, 1280, device="meta")),
                                    "classifier.1.weight is a tensor on the meta device"),
    "weights stored as int8": (lambda sd: {k: v.to(torch.int8) if v.is_floating_point() else v for k, v in sd.items()},
                               "features.stem_conv.0.weight is stored as int8, not as floating-point numbers"),
    "weights stored as bool": (lambda sd: {k: v.bool() if v.is_floating_point() else v for k, v in sd.items()},
                               "features.stem_conv.0.weight is stored as bool, not as floating-point numbers"),
    "no classifier": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("classifier.")},
                      "holds no classifier (classifier.1.weight), so it cannot predict"),
}


@pytest.fixture(scope="module")
def strangers(tmp_path_factory):
    """{case: a .pth file written with torch.save, as anyone can write one}"""
    folder, sd = tmp_path_factory.mktemp("strangers"), b0_state_dict()
    files = {}
    for i, (case, (change, _)) in enumerate(STRANGERS.items()):
        files[case] = folder / f"file{i}.pth"
        torch.save(change(sd), files[case])
    return files


@pytest.mark.parametrize("case", list(STRANGERS))
def test_predict_refuses_a_weights_file_that_is_not_what_it_claims(strangers, case, tmp_path):
    """Before any computation on the values: one line naming the file and the first wrong key (its
    shape, layout, device or dtype against the model's), exit 2. int8 or bool weights were cast
    into the model and answered (bool: every probability nan, exit 0); a 0-d classifier or a
    missing one ended in a traceback."""
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    result = run_script("predict.py", image, "--weights", strangers[case], check=False)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr == f"error: {strangers[case]}" + result.stderr.split(str(strangers[case]), 1)[1]
    assert STRANGERS[case][1] in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("case", ["a 0-d classifier", "10^12 values over 16 MB (stride 0)", "weights stored as bool"])
def test_export_and_train_refuse_them_too(strangers, case, tmp_path):
    tiny = copy_digits(tmp_path / "data", per_class=4)
    for script, args in (("export.py", ["--weights", strangers[case], "--format", "pt2", "--output",
                                        tmp_path / "m.pt2"]),
                         ("train.py", ["--weights", strangers[case], "--data-path", tiny, "--output-dir",
                                       tmp_path / "run", "--img-size", "32", "--epochs", "1", "--workers", "0"])):
        result = run_script(script, *args, check=False)
        assert result.returncode == 2 and STRANGERS[case][1] in result.stderr, (script, result.stderr)
        assert "Traceback" not in result.stderr and str(strangers[case]) in result.stderr
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "run").exists()


def inflating(src, dst, megabytes, method):
    """A copy of the .pth `src` whose first tensor entry is `megabytes` of zeros packed with
    `method`: a file of a few MB that asks whoever opens it for that much memory."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        bomb = next(i.filename for i in old.infolist() if "/data/" in i.filename and i.filename[-1].isdigit())
        for info in old.infolist():
            if info.filename != bomb:
                new.writestr(info, old.read(info))
                continue
            entry = zipfile.ZipInfo(info.filename)
            entry.compress_type = method
            with new.open(entry, "w", force_zip64=True) as f:
                block = bytes(1 << 20)
                for _ in range(megabytes):
                    f.write(block)
    return dst


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2], ids=["deflate", "bzip2"])
def test_a_pth_whose_entry_inflates_to_a_gigabyte_is_refused_before_loading(tmp_path, method):
    """A .pth is a zip archive: one entry deflated from 1 GiB of zeros to about a megabyte made
    torch.load inflate and copy it (3.3 GB of memory). The archive's entries are read first: one
    line, exit 2, and the process stays small."""
    torch.save(b0_state_dict(), tmp_path / "real.pth")
    bomb = inflating(tmp_path / "real.pth", tmp_path / "bomb.pth", 1024, method)
    assert os.path.getsize(bomb) < 40e6
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    code = (f"import runpy, sys; sys.argv = ['predict.py', {str(image)!r}, '--weights', {str(bomb)!r}, "
            "'--device', 'cpu']\ntry:\n    runpy.run_path('predict.py', run_name='__main__')\nfinally:\n"
            "    print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')), "
            "file=sys.stderr)")  # the peak since exec; ru_maxrss keeps the forking parent's
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    *lines, peak_kb = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: refusing to load {bomb}: its entry ") and "to 1,073,741,824 bytes" in lines[0]
    assert int(peak_kb) < 800_000  # about 650 MB is torch's and the model's own
