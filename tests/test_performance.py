"""The performance levers users get by default, and benchmark.py itself. Speed is not asserted
here (benchmark.py measures it as ratios); these check behaviour: that the levers do what they
say and that the benchmark runs end to end."""
import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import utils
from conftest import ROOT, copy_digits, run_script


def resident_after_free(keep):
    """Resident MiB a fresh process holds above its start after allocating and freeing twenty 8 MiB
    tensors, with or without runtime.keep_freed_memory()."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import torch, runtime
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        applied = runtime.keep_freed_memory() if {keep} else False
        start = rss()
        blocks = [torch.ones(2**21) for _ in range(20)]  # 8 MiB each, touched
        del blocks
        print(applied, rss() - start)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


def test_keep_freed_memory_keeps_blocks_for_reuse():
    """With the lever, freed activation-sized blocks stay with the process for the next step;
    with glibc's defaults they go back to the system (and come back as fresh pages, slowly)."""
    applied, kept = resident_after_free(keep=True)
    assert applied, "mallopt should be available on Linux with glibc"
    _, returned = resident_after_free(keep=False)
    assert kept > 100 and returned < 40, (kept, returned)


# a row of benchmark.py's table, the same in every mode: name, the baseline's figure, this repo's,
# the unit, the ratio; "-" for a figure that does not exist
ROW = re.compile(r"^(.+?)\s+([\d.]+|-)\s+([\d.]+|-)\s+(img/s|MiB|ms|s)\s+(?:([\d.]+)x|-)$", re.M)
HEADER = re.compile(r"^.+\S\s+baseline\s+this repo\s+unit\s+(ratio|speed-up)$", re.M)


def table(out):
    """[(name, baseline, this repo, unit, ratio)] of a benchmark.py run's output, numbers as floats
    and "-" as None, after checking that it has one header, in the one format."""
    assert len(HEADER.findall(out)) == 1, out
    number = lambda x: None if x in ("-", "") else float(x)  # noqa: E731
    return [(name.strip(), number(base), number(ours), unit, number(ratio))
            for name, base, ours, unit, ratio in ROW.findall(out)]


@pytest.fixture
def tmp_as_tmpdir(tmp_path, monkeypatch):
    """benchmark.py's temporary folders (photos, runs, exports) under the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def test_benchmark_runs_every_row_with_positive_ratios(tmp_as_tmpdir):
    """benchmark.py end to end at a toy size: every contender's process runs and every row of the
    table has a positive figure on both sides."""
    out = run_script("benchmark.py", "--img-size", "32", "--batch-size", "2", "--steps", "1", "--rounds", "1",
                     "--workers", "0", "--device", "cpu", timeout=600).stdout
    rows = table(out)
    names = [r[0] for r in rows]
    for expected in ("train step: train.py default vs tutorial loop", "peak tensor memory of a training step",
                     "inference: predict.py vs torchvision eager", "predict.py over 20 JPEGs",
                     "inference: export.py .pt2", "inference: export.py .onnx"):
        assert any(n.startswith(expected) for n in names), (expected, out)
    assert len(rows) == 17, out
    assert all(r[1] > 0 and r[2] > 0 and r[3] in ("img/s", "MiB") and r[4] > 0 for r in rows), out


def test_benchmark_versus_times_both_variants_on_both_paths():
    """benchmark.py --model b0 --versus v2_s at a toy size: predict's and training's rows, B0 in the
    baseline column, V2-S in this repo's, each figure positive and the ratio theirs."""
    out = run_script("benchmark.py", "--model", "b0", "--versus", "v2_s", "--img-size", "32", "--batch-size", "2",
                     "--steps", "1", "--rounds", "1", "--device", "cpu", timeout=300).stdout
    assert "EfficientNet-B0 (baseline column) against EfficientNetV2-S (this repo's column)" in out
    rows = table(out)
    assert [r[0] for r in rows] == ["predict, batch of 2 (b0 at 32 px, v2_s at 32 px)",
                                    "training step (b0 at 32 px, v2_s at 32 px)"], out
    assert all(base > 0 and ours > 0 and unit == "img/s" and ratio == pytest.approx(ours / base, rel=0.02)
               for _, base, ours, unit, ratio in rows), out


def test_the_peer_programs_import_nothing_of_this_repo():
    """The programs the modes time this repo against stand for other projects' code: a module of
    this repo's imported there would time this repo's way under their name. They are the files
    the modes name with peer()."""
    folder = os.path.join(ROOT, "benchmarks")
    sources = "".join(open(os.path.join(folder, f), encoding="utf-8").read() for f in os.listdir(folder)
                      if f.endswith(".py"))
    peers = set(re.findall(r'peer\("(\w+\.py)"\)', sources))
    assert {"tutorial_train.py", "plain_start.py", "plain_predict_folder.py", "plain_predict_one.py",
            "until_first_step.py"} <= peers, peers
    repo = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"benchmarks"}
    for name in peers:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & repo, (name, imported & repo)


def test_benchmark_startup_times_both_starts_and_predict_memory(tmp_as_tmpdir):
    """benchmark.py --startup on a folder of 200 files: torchvision's plain start and train.py, each
    stopped at its first optimizer step, then predict.py's peak memory over the folder."""
    out = run_script("benchmark.py", "--startup", "200", "--rounds", "1", "--workers", "0", timeout=600).stdout
    rows = table(out)
    assert [r[0] for r in rows] == ["200 files", "predict.py over them, peak resident memory"], out
    (_, base, ours, unit, ratio), memory = rows
    assert base > 0 and ours > 0 and unit == "s" and ratio == pytest.approx(ours / base, rel=0.1), out
    assert memory[1:] == (None, memory[2], "MiB", None) and memory[2] > 0, out


class GradSpy(torch.nn.Module):
    """Records, at each forward, whether autograd is recording."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.recording = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), []

    def forward(self, x):
        self.recording.append(torch.is_grad_enabled())
        return self.norm(self.conv(x)).mean((2, 3))


def test_validation_and_precise_bn_build_no_autograd_graph():
    """Each validation forward with autograd on kept every activation for a backward that never
    comes: a third of the digits quick start's validation time went there."""
    model = GradSpy()
    data = [(torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))) for _ in range(2)]
    result = utils.evaluate(model, data, torch.device("cpu"), 4, show=False)
    utils.precise_bn(model, data, torch.device("cpu"), show=False)
    assert model.recording == [False] * 4
    assert result["confusion"].sum() == 10


def test_predict_answers_without_importing_torchvision_or_matplotlib(tmp_path):
    """Importing torchvision costs about a second, as long as the prediction of one image: the
    whole of predict.py, ImageNet names for torchvision's own weight file included, runs without
    it (and without matplotlib unless --plot)."""
    import torchvision
    torch.save(torchvision.models.efficientnet_b0().state_dict(), tmp_path / "b0.pth")
    photo = os.path.join(ROOT, "data", "digits", "3", sorted(os.listdir(os.path.join(ROOT, "data", "digits", "3")))[0])
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {ROOT!r})
        sys.argv = ["predict.py", {photo!r}, "--weights", {str(tmp_path / "b0.pth")!r}]
        try:
            runpy.run_path({os.path.join(ROOT, "predict.py")!r}, run_name="__main__")
        finally:
            print("imported:", sorted(m for m in ("torchvision", "matplotlib") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert re.search(r"\.png: .+ \(0\.\d{3}\)", out), out  # an ImageNet class name and its probability
    assert "imported: []" in out, out


def test_benchmark_whole_commands_run_and_compare(tmp_as_tmpdir):
    """benchmark.py --whole at a toy size: the tutorial's training script and train.py, the plain
    folder loop and predict.py, the six-line script and predict.py on one image, each row timed."""
    copy_digits(tmp_as_tmpdir / "tiny")  # 3 classes of 10: 8 train images each, whole batches of 4
    out = run_script("benchmark.py", "--whole", "--data-path", tmp_as_tmpdir / "tiny", "--img-size", "32",
                     "--batch-size", "4", "--rounds", "1", "--images", "8", timeout=600).stdout
    rows = table(out)
    assert [r[0] for r in rows] == ["train.py, 2 epochs on tiny at 32 px, batch 4", "the same, seconds per epoch",
                                    "predict.py over 60 96x96 JPEGs (eval 256/224)",
                                    "predict.py on one image, launch to answer",
                                    "predict.py over 8 500x375 JPEGs at 224 px vs ONNX Runtime",
                                    "the same, predict.py --amp"], out
    assert all(r[1] > 0 and r[2] > 0 and r[3] == "s" and r[4] > 0 for r in rows), out
    assert re.match(r"CPU: .+ \(\d+ CPUs, (AMX|AVX512-BF16, no AMX|no native bf16)\)\n", out), out  # what they hang on


def test_time_to_accuracy_runs_both_programs_and_stops_them_at_the_target(tmp_as_tmpdir):
    """benchmark.py --time-to-accuracy on a tiny folder with a target every epoch reaches: a row per
    seed with the launch-to-target time of the tutorial's program and of train.py, and their ratio;
    both runs stopped there, nothing left running."""
    copy_digits(tmp_as_tmpdir / "tiny")
    out = run_script("benchmark.py", "--time-to-accuracy", "--data-path", tmp_as_tmpdir / "tiny", "--img-size", "32",
                     "--target", "0", "--max-epochs", "3", "--seeds", "0", timeout=600).stdout
    rows = table(out)
    assert [r[0] for r in rows] == ["seed 0: epoch 1 / epoch 1"], out
    _, tutorial, ours, unit, ratio = rows[0]
    assert tutorial > 0 and ours > 0 and unit == "s" and ratio == pytest.approx(tutorial / ours, rel=0.05)


def test_benchmark_loader_compares_both_pipelines_per_core(tmp_as_tmpdir):
    """benchmark.py --loader on a folder of JPEGs: this repo's training and evaluation pipelines
    against the tutorial's, in the one table format, the last row the training pipeline's ratio."""
    copy_digits(tmp_as_tmpdir / "digits", classes=("0", "1"), per_class=40)
    out = run_script("benchmark.py", "--loader", "--data-path", tmp_as_tmpdir / "digits", "--img-size", "32",
                     "--workers", "0", "--rounds", "1", timeout=600).stdout
    rows = table(out)
    assert [r[0] for r in rows] == ["evaluation pipeline vs the tutorial's", "training pipeline vs the tutorial's"], out
    assert all(r[1] > 0 and r[2] > 0 and r[3] == "img/s" and r[4] == pytest.approx(r[2] / r[1], rel=0.02)
               for r in rows), out
    assert "80 images from " in out and "images per second per core" in out


def test_quick_gpu_benchmark_runs_as_a_smoke_test_on_the_cpu(tmp_as_tmpdir):
    """benchmark.py --quick, meant for a GPU machine's few minutes, runs every part at toy sizes
    on the CPU: rows as they are measured, the profile of a step, the whole-command rows."""
    out = run_script("benchmark.py", "--device", "cpu", "--quick", "--img-size", "32", "--batch-size", "4",
                     timeout=600).stdout
    names = [r[0] for r in table(out)]
    assert names[:2] == ["train step, model only, batch 16: train.py vs the tutorial's",
                         "train step, model only, batch 4: train.py vs the tutorial's"], out
    assert any(n.startswith("loader, ") for n in names) and names[-1].startswith("train.py, 1 epoch of 64 JPEGs"), out
    assert "one training step at batch 4: " in out and "aten::" in out and "timm's train.py: not compared" in out
