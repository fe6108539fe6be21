"""export.py: torch.export (.pt2) and ONNX files that give the eager model's outputs, their
sidecar, predict.py on them, docs/deploy.md's onnxruntime example, and bad input."""
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import export
import exported
from conftest import ROOT, run_script
from inference import fuse_bn
from model import create_model
from test_model import randomise


def onnx_or_skip(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime cannot be installed here (requirements-export.txt)")
        pytest.importorskip("onnxscript", reason="onnxscript cannot be installed here (requirements-export.txt)")


def exported_errors(names, folder, formats):
    """{(variant, format): largest |exported - eager| / largest |eager logit|} for B0-B7 with random
    weights and BatchNorm statistics, folded, exported at 32 px with a dynamic batch, on a batch of 3."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    errors = {}
    for name in names:
        model = fuse_bn(randomise(create_model(name, 7), seed=1)).eval()
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
    """The loaded .pt2 (ExportedProgram) and .onnx (ONNX Runtime) of B0 and B4 give the eager logits
    within 1e-4. The variants differ only in widths and depths (and the blocks' count, which is
    the cost of exporting), so B0 and B4, whose widths and depths both round, stand for all eight.
    Two processes share them: exporting is single-threaded work."""
    onnx = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
    formats = ("pt2", "onnx") if onnx else ("pt2",)
    halves = [["b4"], ["b0"]]  # 32 and 16 blocks
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
