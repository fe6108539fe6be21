"""best.pth, last.pth and any weights file: what is refused, saves cut short, what a file holds."""
import argparse
import json
import os
import signal
import subprocess
import sys
import types
import zipfile

import pytest
import torch
import torchvision
from PIL import Image

import checkpoint
import errors
import exported as exported_files
import model_files
import outputs
import runtime
import train as train_script
from conftest import FAST, FakeGPUs, ROOT, assert_user_error, copy_digits, epochs_logged, read_csv, run_script, train
from errors import DataError, WeightsError
from model import VARIANTS, create_model
from model_files import read_class_indices, write_class_indices
from weight_files import read_weights


# ---- weights files that are refused -----------------------------------------------------------

def test_weights_missing(tiny_data, tmp_path):
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "w.pth"), "not found", "w.pth")


def test_weights_not_a_checkpoint(tiny_data, tmp_path):
    (tmp_path / "w.pth").write_text("hello")
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "w.pth"),
                      "w.pth", "not a PyTorch checkpoint")


def test_weights_of_another_variant(tiny_data, tmp_path):
    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    assert_user_error(train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "b1.pth"),
                      "B1", "--model b1")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = None


def test_pickle_that_runs_code_is_refused(tiny_data, tmp_path):
    global SENTINEL
    SENTINEL = tmp_path / "pwned"
    torch.save({"model": Exploit()}, tmp_path / "evil.pth")
    result = train("--data-path", tiny_data, *FAST, "--weights", tmp_path / "evil.pth")
    assert_user_error(result, "evil.pth", "refusing")
    assert not SENTINEL.exists()
    result = run_script("predict.py", os.path.join(tiny_data, "0"), "--weights", tmp_path / "evil.pth", check=False)
    assert_user_error(result, f"error: refusing to load {tmp_path / 'evil.pth'}: unpickling it would run code")
    assert result.stdout == ""  # no image was predicted with it
    assert not SENTINEL.exists()


def test_weights_with_nan_are_refused(tmp_path):
    """What predict.py and --weights read with: a file with a NaN is refused by name."""
    sd = train_script.create_model("b0", 3).state_dict()
    sd["features.top.0.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(errors.WeightsError, match="nan.pth holds NaN or infinite values"):
        model_files.load_model(str(tmp_path / "nan.pth"))


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


FLOWERS = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def test_class_indices_round_trip_in_tutorial_format(tmp_path):
    """class_indices.json is {"0": "daisy", ...} exactly as the tutorial writes it, and reads back."""
    path = tmp_path / "class_indices.json"
    write_class_indices(str(path), FLOWERS)
    tutorial = json.dumps(dict((val, key) for key, val in {c: i for i, c in enumerate(FLOWERS)}.items()), indent=4)
    assert path.read_text(encoding="utf-8") == tutorial
    assert json.loads(path.read_text()) == {"0": "daisy", "1": "dandelion", "2": "roses", "3": "sunflowers",
                                            "4": "tulips"}
    assert read_class_indices(str(path)) == FLOWERS
    # a file written by the tutorial itself reads too
    (tmp_path / "tut.json").write_text(tutorial)
    assert read_class_indices(str(tmp_path / "tut.json")) == FLOWERS


@pytest.mark.parametrize("text", ["not json", '{"1": "a", "2": "b"}', None])
def test_read_class_indices_bad_file_raises(tmp_path, text):
    """A missing, non-JSON or badly numbered class_indices.json is a DataError naming the file."""
    path = tmp_path / "class_indices.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match="class_indices.json"):
        read_class_indices(str(path))


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


# ---- files are replaced whole or not at all ---------------------------------------------------

def test_failed_save_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "best.pth"
    checkpoint.save({"v": torch.ones(3)}, path)

    def broken_write(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        outputs.atomic_write(path, broken_write)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["best.pth"]


class CtrlCWhilePickled:
    """Sends this process SIGINT while torch.save is half-way through writing it."""
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return int, (7,)


def test_ctrl_c_during_a_save_finishes_the_file_first(tmp_path):
    """Ctrl-C in the middle of torch.save used to leave the zip writer broken and end in its own
    RuntimeError, a traceback; now the save completes and the interrupt follows it."""
    path = tmp_path / "last.pth"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in train.py
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save({"v": torch.ones(3), "late": CtrlCWhilePickled(), "w": torch.zeros(2)}, path)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)
    saved = torch.load(path, weights_only=False)
    assert saved["late"] == 7 and torch.equal(saved["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["last.pth"]


# ---- what a checkpoint holds: its format, CPU tensors, each process's RNG state ---------------

def as_format_1(src, dest):
    """A checkpoint as train.py wrote it before checkpoints had a format version: no
    meta["format"], and no flag that was added since (--lean-activations, the recipe's options)."""
    ckpt = torch.load(src, weights_only=True)
    del ckpt["meta"]["format"]
    for flag in ("lean_activations", "drop_path", "precise_bn", "dropout", "balance", "auto_augment", "ra_magnitude",
                 "random_erase", "mixup_alpha", "cutmix_alpha"):
        del ckpt["meta"]["args"][flag]
    torch.save(ckpt, dest)


def test_checkpoints_of_format_1_predict_and_resume(tiny_data, tmp_path):
    """best.pth and last.pth written before the format field still predict exactly as before and
    resume; the resumed run writes the current format with the new flags at their defaults. A
    format newer than this code reads is refused by name."""
    out, old = tmp_path / "run", tmp_path / "old"
    run_script("train.py", "--data-path", tiny_data, "--output-dir", out, *FAST, "--epochs", "1")
    old.mkdir()
    for name in ("best.pth", "last.pth"):
        as_format_1(out / name, old / name)
    assert "format" not in torch.load(old / "last.pth", weights_only=True)["meta"]
    images = os.path.join(tiny_data, "1")
    expected = run_script("predict.py", images, "--weights", out / "best.pth", "--topk", "3").stdout
    assert run_script("predict.py", images, "--weights", old / "best.pth", "--topk", "3").stdout == expected

    result = run_script("train.py", "--resume", old / "last.pth", "--epochs", "2")
    assert "resuming" in result.stdout and "epoch 2/2" in result.stdout
    last = torch.load(old / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["meta"]["format"] == checkpoint.FORMAT
    assert last["meta"]["args"]["lean_activations"] is True and last["meta"]["args"]["img_size"] == 32
    # the old run had stochastic depth 0.2 and no precise BatchNorm: it goes on as it began
    assert (last["meta"]["args"]["drop_path"], last["meta"]["args"]["precise_bn"]) == (0.2, 0)
    assert last["meta"]["args"]["auto_augment"] is None and last["meta"]["args"]["mixup_alpha"] == 0
    assert [int(r["epoch"]) for r in read_csv(old / "metrics.csv")] == [1, 2]  # from the history inside

    # and a file from a newer version of the scripts is named as such, not misread
    ckpt = torch.load(out / "best.pth", weights_only=True)
    ckpt["meta"]["format"] = checkpoint.FORMAT + 1
    torch.save(ckpt, tmp_path / "future.pth")
    result = run_script("predict.py", tiny_data, "--weights", tmp_path / "future.pth", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "future.pth" in result.stderr and "newer version" in result.stderr


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def test_checkpoints_hold_cpu_tensors_whatever_the_device(tmp_path, monkeypatch):
    """best.pth and last.pth from a GPU held CUDA tensors: torch.load(weights_only=True), as
    README shows, failed on a machine without a GPU. (Fake CUDA tensors stand in for real ones.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    saved = []
    monkeypatch.setattr(torch, "save", lambda obj, f: saved.append(obj))
    with FakeTensorMode(allow_non_fake_inputs=True):  # the CPU RNG state is a real tensor
        model = torch.nn.Sequential(torch.nn.Linear(2, 2, device="cuda"), torch.nn.BatchNorm1d(2, device="cuda"))
        state = {"state": {0: {"exp_avg": torch.zeros(2, device="cuda"), "step": torch.ones((), device="cuda")}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
        ema = {"n_averaged": torch.ones((), dtype=torch.long, device="cuda"), "module.0.weight": model[0].weight}
        progress = checkpoint.Progress(best_confusion=torch.zeros(2, 2, device="cuda"))
        holder = lambda sd: types.SimpleNamespace(state_dict=lambda: sd)  # noqa: E731
        rng = [{"torch": torch.get_rng_state(), "python": None, "cuda": torch.zeros(4, dtype=torch.uint8)}]
        checkpoint.save_best(tmp_path / "best.pth", model, {"classes": ["a", "b"]}, 1, 0.5)
        checkpoint.save_last(tmp_path / "last.pth", model, {}, progress, holder(state), holder({"last_epoch": 1}),
                             holder({}), holder(ema), rng)
    found = [t for obj in saved for t in tensors_in(obj)]
    assert len(found) >= 15 and {t.device.type for t in found} == {"cpu"}
    assert saved[0]["model"]._metadata[""]["version"] == 1 and saved[0]["model"]._metadata["1"]["version"] == 2
def test_rng_state_resumes_on_a_machine_with_fewer_gpus(monkeypatch):
    """last.pth held one CUDA RNG state per visible GPU, all restored by index: on a machine with
    fewer GPUs, --resume raised IndexError. Each process saves and restores its own GPU's state."""
    saving = FakeGPUs(monkeypatch, 2)
    state = runtime.rng_state(torch.device("cuda", 1))  # rank 1 of a 2-GPU machine
    assert torch.equal(state["cuda"], saving.rng[1])
    resuming = FakeGPUs(monkeypatch, 1)
    runtime.set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(resuming.rng[0], saving.rng[1])
    old_file = dict(state, cuda=[saving.rng[0], saving.rng[1]])  # a last.pth written before: all GPUs
    runtime.set_rng_state(old_file, torch.device("cuda", 0))
    assert torch.equal(resuming.rng[0], saving.rng[0])


def test_rng_state_on_the_cpu_leaves_the_gpus_alone(monkeypatch):
    """Training on the CPU of a GPU machine read every GPU's state (a CUDA context on each)."""
    fake = FakeGPUs(monkeypatch, 2)
    assert "cuda" not in runtime.rng_state(torch.device("cpu"))
    assert fake.events == []


@pytest.mark.parametrize("part", ["optimizer state", "optimizer groups", "ema shape", "ema keys"])
def test_a_last_pth_whose_optimizer_or_ema_state_does_not_fit_is_refused_before_loading(run_copy, part):
    """A stranger's last.pth (or a damaged one) whose optimizer or EMA state does not fit the model:
    before, a traceback in the first step or inside load_state_dict; now one line naming the part."""
    data, run = run_copy
    ckpt = torch.load(run / "last.pth", weights_only=True)
    if part == "optimizer state":
        ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    elif part == "optimizer groups":
        ckpt["optimizer"]["param_groups"][0]["params"].pop()
    elif part == "ema shape":
        ckpt["ema"]["module.classifier.1.weight"] = torch.zeros(3, 3)
    else:
        del ckpt["ema"]["n_averaged"]
    torch.save(ckpt, run / "last.pth")
    result = train("--resume", run / "last.pth", "--epochs", "3", "--data-path", data)
    expected = {"optimizer state": "its optimizer state 0.exp_avg is of shape [3] where its parameter's is [32, 3, 3, 3]",
                "optimizer groups": "its optimizer is a state of [",
                "ema shape": "its ema module.classifier.1.weight is of shape [3, 3] where the model's is [3, 1280]",
                "ema keys": "its ema is without n_averaged, unlike this model's average"}[part]
    assert_user_error(result, f"--resume: {run / 'last.pth'}: {expected}")
    assert epochs_logged(run) == [1, 2]  # the run is left as it was
