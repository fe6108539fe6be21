"""export.py: torch.export (.pt2) and ONNX files that give the eager model's outputs, their
sidecar, predict.py on them, docs/deploy.md's onnxruntime example, bad input, and exported files
from someone else (code that would run on loading, a sidecar that does not fit)."""
import hashlib
import importlib.util
import io
import json
import multiprocessing
import operator
import os
import re
import subprocess
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import export
import exported
import exported as exported_files
from conftest import ROOT, randomise, run_script
from errors import WeightsError
from inference import fuse_bn
from model import create_model


def onnx_or_skip(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime cannot be installed here (requirements-export.txt)")
        pytest.importorskip("onnxscript", reason="onnxscript cannot be installed here (requirements-export.txt)")


def random_weights(name):
    """`name` with random weights and BatchNorm statistics. V2's full 3x3 convs in FusedMBConv grow
    randomise's activations to 1e6 and more, where float rounding alone moves a logit by 3 %: V2
    gets its own initialisation with perturbed statistics instead (logits of about 0.05)."""
    if not name.startswith("v2_"):
        return randomise(create_model(name, 7), seed=1)
    torch.manual_seed(1)
    model = create_model(name, 7, zero_init_residual=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def exported_errors(names, folder, formats):
    """{(variant, format): largest |exported - eager| / largest |eager logit|} for variants with random
    weights and BatchNorm statistics (random_weights), folded, exported at 32 px with a dynamic batch, on a batch of 3."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    errors = {}
    for name in names:
        model = fuse_bn(random_weights(name)).eval()
        with torch.no_grad():
            eager = model(x)
        program = export.export_program(model, 32, dynamic_batch=True)
        for fmt in formats:
            path = os.path.join(folder, f"{name}.{fmt}")
            export.save(program, fmt, path)
            got = exported.ExportedModel(path, True, torch.device("cpu"))(x)
            errors[name, fmt] = ((got - eager).abs().max() / eager.abs().max()).item()
    return errors


def test_variants_export_with_the_eager_outputs(tmp_path):
    """The loaded .pt2 (ExportedProgram) and .onnx (ONNX Runtime) of B0, B4 and V2-S give the eager
    logits within 1e-4. B0-B7 differ only in widths and depths (and the blocks' count, which is
    the cost of exporting), so B0 and B4, whose widths and depths both round, stand for all eight;
    V2-S, with FusedMBConv, for V2's three. Two processes share them: exporting is single-threaded work."""
    onnx = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
    formats = ("pt2", "onnx") if onnx else ("pt2",)
    halves = [["b4", "b0"], ["v2_s"]]  # 48 and 40 blocks
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        table = {}
        for errors in pool.map(exported_errors, halves, [str(tmp_path)] * 2, [formats] * 2):
            table.update(errors)
    print("\nlargest |exported - eager| / largest |eager logit|:\n" + "\n".join(
        f"  {name}  " + "  ".join(f"{fmt} {table[name, fmt]:.1e}" for fmt in formats) for name in sorted(halves[0] + halves[1])))
    assert sorted(table) == sorted((name, fmt) for half in halves for name in half for fmt in formats)
    assert all(err < 1e-4 for err in table.values()), table
    if not onnx:
        pytest.skip("the .onnx half: onnx, onnxscript or onnxruntime cannot be installed here (requirements-export.txt)")


@pytest.fixture
def trained(tiny_run):
    """A real train.py run on a tiny digits folder: (data folder, run folder)."""
    return tiny_run[:2]


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_predict_on_an_exported_file_gives_the_checkpoints_answers(trained, fmt, tmp_path):
    """export.py writes FILE and FILE.json (classes, sizes, normalisation, sha256 of FILE);
    predict.py on FILE gives best.pth's top-k for every image."""
    onnx_or_skip(fmt)
    data, run = trained
    out = tmp_path / f"model.{fmt}"
    result = run_script("export.py", "--weights", run / "best.pth", "--format", fmt, "--output", out)
    assert f"wrote {out}" in result.stdout
    side = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    best = torch.load(run / "best.pth", weights_only=True)
    assert side["classes"] == ["0", "1", "2"] and side["variant"] == "b0"
    assert (side["resize"], side["crop"]) == (best["meta"]["eval_resize"], best["meta"]["eval_crop"])
    assert side["mean"] == best["meta"]["mean"] and side["input"]["shape"] == [1, 3, 32, 32]
    assert side["sha256"] == exported.sha256(out)
    assert sorted(os.listdir(tmp_path)) == [f"model.{fmt}", f"model.{fmt}.json"]

    def answers(weights, how):
        result = run_script("predict.py", os.path.join(data, "1"), os.path.join(data, "2"), "--weights", weights,
                            "--topk", "3", "--json")
        assert result.stderr.rstrip().endswith(f"; {how}"), result.stderr  # the summary says what ran
        return [[(t["class"], t["prob"]) for t in json.loads(line)["topk"]] for line in result.stdout.splitlines()]

    expected = answers(run / "best.pth", "fp32, fused oneDNN convs")
    got = answers(out, "ONNX Runtime" if fmt == "onnx" else "the exported program")
    assert [[c for c, _ in r] for r in got] == [[c for c, _ in r] for r in expected]
    assert [p for r in got for _, p in r] == pytest.approx([p for r in expected for _, p in r], abs=1e-4)

    with open(out, "ab") as f:  # the file changed after export: its sidecar no longer describes it
        f.write(b"\0")
    changed = run_script("predict.py", os.path.join(data, "1"), "--weights", out, check=False)
    assert changed.returncode == 2 and "sha256 differs" in changed.stderr


def test_readme_onnxruntime_example_runs_without_this_repo(trained, tmp_path):
    """docs/deploy.md's example, run as it stands in a folder outside the repo with the
    repo off the path, names the class that predict.py names."""
    onnx_or_skip("onnx")
    data, run = trained
    run_script("export.py", "--weights", run / "best.pth", "--output", tmp_path / "best.onnx", "--dynamic-batch")
    guide = open(os.path.join(ROOT, "docs", "deploy.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", guide, re.S).group(1)
    image = os.path.join(data, "2", sorted(os.listdir(os.path.join(data, "2")))[0])
    os.symlink(image, tmp_path / "photo.jpg")  # a PNG under the example's name: Pillow goes by the content
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name = out.stdout.split()[0]
    expected = json.loads(run_script("predict.py", image, "--weights", run / "best.pth", "--json").stdout)
    assert name == expected["topk"][0]["class"]
    assert float(out.stdout.split()[1]) == pytest.approx(expected["topk"][0]["prob"], abs=0.05)


def test_bad_input_is_one_line_and_leaves_nothing(trained, tmp_path):
    _, run = trained
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    cases = [(["--weights", tmp_path / "notes.pth", "--format", "pt2"], "notes.pth"),
             (["--weights", run / "best.pth", "--format", "tflite"], "invalid choice: 'tflite'"),
             (["--weights", run / "best.pth", "--format", "pt2", "--output", tmp_path / "no" / "m.pt2"],
              "does not exist"),
             (["--weights", run / "best.pth", "--format", "pt2", "--output", tmp_path / "m.onnx"], "should end in .pt2")]
    for flags, words in cases:
        result = run_script("export.py", *flags, check=False)
        assert result.returncode == 2 and words in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr and words in result.stderr.strip().splitlines()[-1], result.stderr
    assert os.listdir(tmp_path) == ["notes.pth"]


def test_onnx_without_its_packages_says_what_to_install(monkeypatch, capsys, trained):
    _, run = trained
    monkeypatch.setattr(export, "missing_onnx_packages", lambda: ["onnxscript"])
    args = export.get_args_parser().parse_args(["--weights", str(run / "best.pth")])
    assert export.main(args) == 2
    err = capsys.readouterr().err
    assert "pip install -r requirements-export.txt" in err and "--format pt2" in err
    assert not os.path.exists(run / "best.onnx")


# ---- exported files from someone else: code run on loading, the batch, the sidecar ------------

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
