"""Tests for model.py: sizes, weight loading in all three formats, safety, fusion, checkpointing,
export and the paper's structural rules. CPU only, 64x64 inputs, well under two minutes."""
import copy
import functools
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint as real_checkpoint
from torchvision.ops import StochasticDepth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import activations  # noqa: E402
import model as M  # noqa: E402
import weight_files  # noqa: E402
from inference import CPUInference, fuse_bn  # noqa: E402
from errors import WeightsError  # noqa: E402
from model import VARIANTS, MBConv, create_model, efficientnet, make_divisible  # noqa: E402
from weight_files import load_weights, read_weights  # noqa: E402
from conftest import randomise  # noqa: E402

NAMES = [name for name in VARIANTS if not name.startswith("v2_")]  # b0 .. b7
V2_NAMES = ["v2_s", "v2_m", "v2_l"]
PARAMS = {"b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232,
          "b4": 19_341_616, "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960,
          "v2_s": 21_458_488, "v2_m": 54_139_356, "v2_l": 118_515_272}
BLOCKS = {"b0": 16, "b1": 23, "b2": 23, "b3": 26, "b4": 32, "b5": 39, "b6": 45, "b7": 55}
DROPOUT = {"b0": 0.2, "b1": 0.2, "b2": 0.3, "b3": 0.3, "b4": 0.4, "b5": 0.4, "b6": 0.5, "b7": 0.5,
           "v2_s": 0.2, "v2_m": 0.3, "v2_l": 0.4}
TORCHVISION_EPS = weight_files.TORCHVISION_BN_EPS  # proven by the output comparison with torchvision below
TUTORIAL_KEYS = ["features.stem_conv.0.weight", "features.stem_conv.1.running_var",
                 "features.1a.block.dwconv.0.weight", "features.1a.block.se.fc1.weight",
                 "features.2a.block.expand_conv.0.weight", "features.2b.block.project_conv.1.bias",
                 "features.top.0.weight", "classifier.1.weight"]
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def image(seed=0):
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def output(model, x):
    """Eval-mode logits; they must be finite and not all zero for a comparison to mean anything."""
    with torch.no_grad():
        y = model.eval()(x)
    assert torch.isfinite(y).all() and y.abs().max() > 0
    return y


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def skeleton(name):
    """A model on the meta device: every shape and hyper-parameter, no memory; read-only, shared."""
    with torch.device("meta"):
        return efficientnet(name)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def mbconv_blocks(model):
    return [(n, m) for n, m in model.features.named_children() if isinstance(m, MBConv)]


def residual_blocks(model):
    """MBConv and FusedMBConv blocks in order (V2 nests them in its stages)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, M.Residual)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-2 64 px work gains nothing from threads, and on a busy 2-core machine OpenMP's
    barriers made a B1 forward take 3.7 s instead of 0.02 s; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def b0_file(tmp_path_factory):
    """A randomised 1000-class B0 in the tutorial format, saved to disk: (path as str, state_dict)."""
    sd = randomise(efficientnet("b0", bn_eps=1e-3), seed=7).state_dict()
    path = tmp_path_factory.mktemp("weights") / "source.pth"  # no variant in the name
    torch.save(sd, path)
    return str(path), sd


# ---------------------------------------------------------------------------------------------
# 1. sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count(name):
    """Every variant has the published (torchvision) parameter count at 1000 classes, as the
    variants table (and --model's help) says."""
    assert n_params(skeleton(name)) == PARAMS[name] == VARIANTS[name].params
    with torch.device("meta"):
        assert n_params(getattr(M, f"efficientnet_{name}")()) == PARAMS[name]


# ---------------------------------------------------------------------------------------------
# 2. weight formats
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_torchvision_weights_give_torchvision_outputs(name, tmp_path):
    """An official torchvision state_dict file loads and reproduces torchvision's outputs; this
    only works with torchvision's eps (1e-5 for B0-B4, 1e-3 for B5-B7), which the check proves."""
    tv = randomise(getattr(torchvision.models, f"efficientnet_{name}")(weights=None), seed=1)
    path = tmp_path / f"efficientnet_{name}.pth"
    torch.save(tv.state_dict(), path)
    x = image()
    expected = output(tv, x)

    ours = load_weights(create_model(name), str(path))
    assert all(bn.eps == TORCHVISION_EPS[name] for bn in ours.modules() if isinstance(bn, nn.BatchNorm2d))
    assert rel_err(expected, output(ours, x)) <= TOL

    for bn in ours.modules():  # the other eps must visibly change the outputs
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps = 1e-3 if TORCHVISION_EPS[name] == 1e-5 else 1e-5
    assert rel_err(expected, output(ours, x)) > 100 * TOL, "randomised BN stats should expose a wrong eps"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_and_repo_checkpoints_give_identical_outputs(name, tmp_path):
    """Tutorial state_dicts and this repo's checkpoints (also with DDP `module.` and torch.compile
    `_orig_mod.` prefixes) load into create_model and reproduce the source model's outputs."""
    src = randomise(efficientnet(name, bn_eps=1e-3), seed=2)
    sd = src.state_dict()
    assert all(key in sd for key in TUTORIAL_KEYS)
    meta = {"variant": name, "bn_eps": 1e-3}
    files = {
        "tutorial": sd,
        "repo": {"model": sd, "meta": meta},
        "repo_ddp": {"model": prefixed(sd, "module."), "meta": meta},
        "repo_compiled": {"model": prefixed(sd, "_orig_mod."), "meta": meta},
    }
    x = image()
    expected = output(src, x)
    for label, obj in files.items():
        assert read_weights(obj)[1]["variant"] == name, label
        path = tmp_path / f"{label}.pth"
        torch.save(obj, path)
        assert rel_err(expected, output(load_weights(create_model(name), str(path)), x)) <= TOL, label
        path.unlink()  # B7 files are 265 MB each


def test_repo_checkpoint_bn_eps_is_honoured(tmp_path):
    """A checkpoint's recorded bn_eps (1e-5 after fine-tuning torchvision's B0) is used on load."""
    src = randomise(efficientnet("b0", bn_eps=1e-5), seed=6)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": src.state_dict(), "meta": {"variant": "b0", "bn_eps": 1e-5}}, path)
    x = image()
    assert rel_err(output(src, x), output(load_weights(create_model("b0"), str(path)), x)) <= TOL


# ---------------------------------------------------------------------------------------------
# 3-5. loading: other class count, wrong variant, unsafe or unusable files
# ---------------------------------------------------------------------------------------------

def test_other_class_count_gets_new_head_and_keeps_backbone(b0_file, capsys):
    """Fine-tuning: a 1000-class file loads into a 5-class model with the backbone intact and
    a one-line note; with a matching class count nothing is printed."""
    path, sd = b0_file
    model = load_weights(create_model("b0", num_classes=5), path)
    assert model.classifier[1].out_features == 5
    assert output(model, image()).shape == (2, 5)
    loaded = model.state_dict()
    backbone = [k for k in sd if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(loaded[k], sd[k]) for k in backbone)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    note = lines[0].replace(path, "")
    assert "1000" in note and "5" in note

    load_weights(create_model("b0", num_classes=5), path, verbose=False)
    load_weights(create_model("b0", num_classes=1000), path)
    assert capsys.readouterr().out == ""


def test_messages_name_the_file_when_given_a_path(b0_file, capsys):
    """Notes and errors name the weights file also when it is passed as a pathlib.Path."""
    path = Path(b0_file[0])
    load_weights(create_model("b0", num_classes=5), path)
    assert path.name in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["tutorial", "torchvision"])
def test_wrong_variant_is_refused_and_named(b0_file, fmt, tmp_path):
    """A B0 file loaded as B2 is a WeightsError that tells the user it holds B0 weights."""
    path = b0_file[0]
    if fmt == "torchvision":
        path = tmp_path / "torchvision.pth"
        torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as err:
        load_weights(create_model("b2"), str(path))
    assert "b0" in str(err.value).lower()


class RunsCode:
    """Unpickling this creates `sentinel`: what a malicious checkpoint could do."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return exec, (f"open({self.sentinel!r}, 'w').close()",)


def test_code_running_pickle_is_refused(tmp_path):
    """weights_only loading: a checkpoint that would run code on unpickling is a WeightsError and
    its code never runs (the payload is first shown to be live with weights_only=False)."""
    probe = tmp_path / "probe_ran"
    torch.save({"model": RunsCode(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert probe.exists()

    sentinel = tmp_path / "evil_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(sentinel), "meta": {"variant": "b0"}}, path)
    with pytest.raises(WeightsError):
        load_weights(create_model("b0"), str(path))
    assert not sentinel.exists()


def _bad_file(kind, tmp_path):
    path = tmp_path / f"{kind}.pth"
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("hello world\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "foreign_state_dict":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif kind == "whole_module":
        torch.save(nn.Linear(2, 2), path)
    return path  # "missing": never created


@pytest.mark.parametrize("kind", ["missing", "folder", "list", "foreign_state_dict", "whole_module",
                                  "text", "empty"])
def test_unusable_weights_file_is_a_weights_error(kind, tmp_path):
    """Anything that is not an EfficientNet weights file is a WeightsError, not another traceback."""
    path = _bad_file(kind, tmp_path)
    with pytest.raises(WeightsError):
        load_weights(create_model("b0"), path)


# ---------------------------------------------------------------------------------------------
# 6-8. fuse_bn, gradient checkpointing, torch.export
# ---------------------------------------------------------------------------------------------

def test_fuse_bn_keeps_outputs_and_removes_batchnorm():
    """fuse_bn folds every BatchNorm into its conv without changing eval outputs."""
    model = randomise(efficientnet("b0"), seed=3)
    x = image()
    expected = output(model, x)
    fused = fuse_bn(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert rel_err(expected, output(fused, x)) <= TOL


@pytest.mark.skipif(not CPUInference.available(), reason="this PyTorch has no oneDNN (mkldnn)")
@pytest.mark.parametrize("name", ["b0", "b2"])
def test_cpu_inference_gives_the_fused_models_outputs(name):
    """predict.py's CPU path: every conv one oneDNN call, squeeze-excite as matrix products, and
    the batch split into chunks run side by side on threads of their own. Each image must get
    its own logits, in order, however the batch is split: one chunk, chunks run one after the
    other (one thread), or on a pool of two; and the thread count is put back."""
    fused = fuse_bn(randomise(efficientnet(name, num_classes=7), seed=5))
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)  # 5 images: the last chunk is a short one
    expected = output(fused, x)
    fast = CPUInference(copy.deepcopy(fused), pixels=2 * 64 * 64)  # chunks of 2 images
    assert not any(isinstance(m, nn.Conv2d) for m in fast.modules())
    before = torch.get_num_threads()
    try:
        for threads, pixels in ((1, 2 * 64 * 64), (2, 2 * 64 * 64), (2, 10**9)):
            torch.set_num_threads(threads)
            fast.pixels = pixels
            with torch.no_grad():
                got = fast(x)
            assert torch.get_num_threads() == threads
            assert got.shape == (5, 7) and rel_err(expected, got) <= 1e-5, (threads, pixels)
    finally:
        torch.set_num_threads(before)
    assert fast.pool is not None  # the two-thread run used the pool


def _train_step(model, x, y, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = F.cross_entropy(model.train()(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _checkpointing_pair(name="b4"):
    plain = randomise(efficientnet(name), seed=4)
    ckpt = efficientnet(name, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


@pytest.mark.parametrize("name", ["b4", "v2_s"])
def test_gradient_checkpointing_gives_same_loss_and_gradients(monkeypatch, name):
    """grad_checkpointing=True (B4 and V2-S, training, dropout and stochastic depth live) recomputes
    every block in backward yet yields the same loss and gradients as plain training."""
    plain, ckpt = _checkpointing_pair(name)
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(M, "checkpoint", counting_checkpoint)
    dropped = []

    def record_drop(module, inputs, out):
        dropped.append(bool(((out == 0) & (inputs[0] != 0)).flatten(1).all(1).any()))

    for m in plain.modules():
        if isinstance(m, M.DropPath):
            m.register_forward_hook(record_drop)
    x, y = image(), torch.tensor([1, 3])

    loss_a, grads_a = _train_step(plain, x, y, seed=0)
    assert any(dropped), "stochastic depth should drop a residual branch with this seed"
    loss_b, grads_b = _train_step(ckpt, x, y, seed=0)
    assert len(calls) == {"b4": 32, "v2_s": 40}[name] + 2, "every block should go through checkpoint()"
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-4, atol=1e-6, msg=key)

    loss_c, _ = _train_step(plain, x, y, seed=1)
    assert not torch.allclose(loss_a, loss_c), "training forward should be random (dropout, drop path)"


def test_gradient_checkpointing_keeps_batchnorm_statistics():
    """One training step with grad_checkpointing leaves the same BN running stats as without."""
    plain, ckpt = _checkpointing_pair("b0")
    x, y = image(), torch.tensor([1, 3])
    _train_step(plain, x, y, seed=0)
    _train_step(ckpt, x, y, seed=0)
    for (key, a), b in zip(plain.named_buffers(), ckpt.buffers()):  # running_mean/var, num_batches_tracked
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=key)


def test_gradient_checkpointing_counts_sync_batchnorm_statistics_once():
    """train.py --sync-bn --grad-checkpointing: SyncBatchNorm is not a BatchNorm2d (both derive from
    _BatchNorm), and each layer's statistics must still be counted once per step, not again by the
    recomputation. Without a process group SyncBatchNorm normalises as BatchNorm does (a gloo group
    would not help: SyncBatchNorm refuses CPU tensors once one exists), so this runs on a CPU."""
    plain, ckpt = (_without_randomness(nn.SyncBatchNorm.convert_sync_batchnorm(m)) for m in _checkpointing_pair("b0"))
    assert isinstance(ckpt.features.stem_conv[1], nn.SyncBatchNorm)
    x, y = image(), torch.tensor([1, 3])
    _train_step(plain, x, y, seed=0)
    _train_step(ckpt, x, y, seed=0)
    assert ckpt.features.stem_conv[1].num_batches_tracked.item() == 1
    for (key, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=key)


def test_compiled_gradient_checkpointing_trains_and_counts_statistics_once():
    """train.py --compile --grad-checkpointing: a compiled, checkpointed B0 (lean path on) takes a
    training step with the gradients and BN statistics of an eager step without checkpointing.
    The aot_eager backend runs what decides both, Dynamo (which refused checkpoint's context_fn)
    and AOTAutograd (which places the buffer updates and the recomputation), in ~30 s on a CPU;
    the default backend adds only code generation, and takes minutes here."""
    plain, ckpt = (_without_randomness(m) for m in _checkpointing_pair("b0"))
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 3])
    _, grads = _train_step(plain, x, y, seed=0)
    torch._dynamo.reset()
    F.cross_entropy(torch.compile(ckpt.train(), backend="aot_eager")(x), y).backward()
    scale = max(g.abs().max() for g in grads.values())
    for key, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], rtol=1e-4, atol=1e-5 * scale, msg=key)
    assert ckpt.features.stem_conv[1].num_batches_tracked.item() == 1
    for (key, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=key)


def _without_randomness(model):
    for m in model.modules():
        if isinstance(m, (M.DropPath, StochasticDepth, nn.Dropout)):  # ours and torchvision's
            m.p = 0.0
    return model


@pytest.mark.parametrize("name, channels_last", [("b0", False), ("b0", True), ("v2_s", True)],
                         ids=["b0-nchw", "b0-channels_last", "v2_s-channels_last"])
def test_training_step_matches_torchvision(name, channels_last):
    """The lean training path (BatchNormSiLU, SigmoidGate) computes what torchvision's autograd
    computes: the same loss, the same gradients for every parameter, the same BN statistics; in
    B0 and in V2-S (FusedMBConv's layers are ConvBNAct, lean too)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tv = getattr(torchvision.models, f"efficientnet_{name}")()
    randomise(tv, seed=8)
    ours = load_weights(create_model(name), tv.state_dict())
    rename = weight_files._from_torchvision if name.startswith("b") else dict
    tv, ours = (_without_randomness(m).to(memory_format=fmt).train() for m in (tv, ours))
    x, y = image().contiguous(memory_format=fmt), torch.tensor([1, 3])

    loss_tv, grads_tv = _train_step(tv, x, y, seed=0)
    loss, grads = _train_step(ours, x, y, seed=0)
    torch.testing.assert_close(loss, loss_tv, rtol=1e-6, atol=1e-6)
    grads_tv = rename(grads_tv)
    assert grads.keys() == grads_tv.keys()
    scale = max(g.abs().max() for g in grads_tv.values())  # some BN-bias gradients are ~0: float noise
    for key in grads:
        torch.testing.assert_close(grads[key], grads_tv[key], rtol=1e-4, atol=1e-5 * scale, msg=key)
    buffers_tv = rename(dict(tv.named_buffers()))
    for key, value in ours.named_buffers():
        torch.testing.assert_close(value, buffers_tv[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lean_functions_pass_gradcheck():
    """Both hand-written backward passes agree with finite differences (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    stats = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: activations.BatchNormSiLU.apply(*t, *stats, 0.1, 1e-3), (x, weight, bias))
    z = torch.randn(3, 4, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(activations.SigmoidGate.apply, (x, z))


def test_lean_backward_asks_batchnorm_for_a_positive_eps(monkeypatch):
    """PyTorch 2.11's F.batch_norm refuses eps <= 0 (later versions allow it): the lean backward
    must run on every PyTorch that requirements.txt admits, so it gives BatchNorm its real eps."""
    real = F.batch_norm

    def strict(*args, **kwargs):
        if kwargs.get("eps", 1e-5) <= 0:
            raise ValueError(f"batch_norm eps must be positive, but got {kwargs['eps']}")
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", strict)
    x, weight, bias, mean, var = _lean_inputs(torch.float32)
    activations.BatchNormSiLU.apply(x, weight, bias, mean, var, 0.1, 1e-3).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _lean_inputs(dtype=torch.float64, shape=(3, 4, 5, 5)):
    """Inputs for BatchNormSiLU: x (N, C, H, W) of `dtype` in channels-last, and weight, bias,
    running mean and variance in float64 for a float64 x, else in float32 as under AMP."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).mul(2).add(1).to(dtype).contiguous(memory_format=torch.channels_last)
    c, p = shape[1], torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = (torch.rand(c, generator=g) + 0.5).to(p), torch.randn(c, generator=g).to(p)
    return (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
            torch.zeros(c, dtype=p), torch.ones(c, dtype=p))


@pytest.mark.parametrize("function", ["BatchNormSiLU", "SigmoidGate"])
def test_lean_functions_refuse_double_backward(function):
    """The hand-written backwards are not differentiable themselves (they use statistics and gates
    saved without their graph), so a second derivative through them is an error, never a wrong
    number: create_graph=True works, differentiating its result raises (autograd.grad on those
    inputs raises too, but only to say that they are not in the graph)."""
    x, weight, bias, *stats = _lean_inputs()
    if function == "BatchNormSiLU":
        inputs, out = (x, weight, bias), activations.BatchNormSiLU.apply(x, weight, bias, *stats, 0.1, 1e-3)
    else:
        z = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
        inputs, out = (x, z), activations.SigmoidGate.apply(x, z)
    first = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        sum(g.sum() for g in first).backward()


class OutputsRecorded(TorchDispatchMode):
    """Records (op, dtype, numel) of every tensor each aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel()))
        return result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lean_backward_makes_no_fp32_copy_of_a_half_precision_activation(dtype):
    """Under AMP a BN input is bf16 or fp16 and its statistics fp32. BatchNormSiLU's backward
    recomputes the BN output; made from fp32 scale and shift it would come out as an fp32 tensor
    as large as the activation, twice its size, in every layer's backward: the memory the lean
    path is there to save. Every activation-sized tensor of the backward is in x's dtype."""
    x, weight, bias, *stats = _lean_inputs(dtype, shape=(4, 16, 8, 8))
    out = activations.BatchNormSiLU.apply(x, weight, bias, *stats, 0.1, 1e-3)
    with OutputsRecorded() as recorded:
        out.backward(torch.ones_like(out))
    assert x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    large = [(op, d) for op, d, n in recorded.outputs if n >= x.numel()]
    assert large and all(d == dtype for _, d in large), large


def _lean_pair(seed=9):
    """The same randomised B0 twice: with the lean Functions (the default) and with plain autograd."""
    lean = _without_randomness(randomise(efficientnet("b0"), seed=seed))
    plain = _without_randomness(efficientnet("b0", lean=False))
    plain.load_state_dict(lean.state_dict())
    return lean, plain


def _uses_lean_functions(model, x):
    """Whether a training forward records BatchNormSiLU or SigmoidGate nodes in the graph."""
    names, todo = set(), [model.train()(x).sum().grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [next_fn for next_fn, _ in node.next_functions]
    return bool(names & {"BatchNormSiLUBackward", "SigmoidGateBackward"})


def test_lean_switch_off_uses_plain_autograd_and_keeps_more():
    """lean=False (train.py --no-lean-activations) takes autograd's path: no hand-written backward
    in the graph, and the memory saving is gone; lean=True records them."""
    lean, plain = _lean_pair()
    x = image()
    assert _uses_lean_functions(lean, x) and not _uses_lean_functions(plain, x)
    assert saved_for_backward(lean, x) < 0.7 * saved_for_backward(plain, x)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_lean_matches_plain_under_bf16_autocast(channels_last):
    """Under bf16 autocast (train.py's --amp bf16, the default on GPUs that have it; channels-last
    is train.py's default layout) the lean path gives the loss, gradients and BN statistics that
    plain autograd gives, within bf16 precision: the two are closer to each other than either is
    to fp32, and lean is no further from fp32 than plain."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lean, plain = (m.to(memory_format=fmt) for m in _lean_pair())
    x, y = image().contiguous(memory_format=fmt), torch.tensor([1, 3])
    flat = lambda grads: torch.cat([g.flatten() for _, g in sorted(grads.items())])  # noqa: E731
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    reference = flat(_train_step(plain, x, y, seed=0)[1])  # fp32
    _without_randomness(plain).load_state_dict(lean.state_dict())  # undo that step's BN statistics
    results = []
    for model in (lean, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_train_step(model, x, y, seed=0))
    (loss_lean, grads_lean), (loss_plain, grads_plain) = results
    torch.testing.assert_close(loss_lean, loss_plain, rtol=2e-2, atol=1e-3)
    g_lean, g_plain = flat(grads_lean), flat(grads_plain)
    assert rel(g_lean, g_plain) < 0.05 < rel(g_plain, reference), (rel(g_lean, g_plain), rel(g_plain, reference))
    assert rel(g_lean, reference) <= 1.1 * rel(g_plain, reference)
    for (key, a), b in zip(lean.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3, msg=key)


def test_lean_matches_plain_with_gradient_accumulation():
    """Two micro-batches accumulated into one step (train.py --grad-accum 2): the summed gradients
    and the BN statistics after both passes agree with plain autograd."""
    lean, plain = _lean_pair()
    batches = [(image(seed), torch.tensor([seed, 5])) for seed in (1, 2)]
    grads = []
    for model in (lean, plain):
        model.zero_grad()
        for x, y in batches:
            (F.cross_entropy(model.train()(x), y) / len(batches)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    scale = max(g.abs().max() for g in grads[1].values())
    for key in grads[1]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-5 * scale, msg=key)
    for (key, a), b in zip(lean.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    assert lean.features.stem_conv[1].num_batches_tracked.item() == 2


def saved_for_backward(model, x):
    """Bytes of the distinct activations (not parameters) autograd keeps for backward during one
    training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x)
    return sum(storages.values())


def test_training_keeps_under_two_thirds_of_torchvisions_activations():
    """BatchNormSiLU and SigmoidGate keep one BN input per conv instead of the BN input, BN
    output and a copy, and the gated output instead of a second tensor: B0 keeps 0.62x."""
    x = image()
    tv = saved_for_backward(torchvision.models.efficientnet_b0(), x)
    ours = saved_for_backward(efficientnet("b0"), x)
    assert ours <= 0.65 * tv, f"{ours / tv:.2f}x"


def test_torch_export_matches_eager():
    """torch.export works on the model as built, BatchNorm unfolded, and the exported program
    computes the eager outputs (test_export.py exports the folded variants)."""
    model = randomise(efficientnet("b0"), seed=5)
    x = image()
    program = torch.export.export(model.eval(), (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 9. the paper's structure
# ---------------------------------------------------------------------------------------------

def test_make_divisible_rounds_to_multiples_of_8_never_10_percent_down():
    """Channel rounding: multiples of 8, never below 90 % of the request, same as torchvision."""
    from torchvision.models._utils import _make_divisible
    b0_widths = (32, 16, 24, 40, 80, 112, 192, 320, 1280)
    requests = [c / 10 for c in range(1, 30000)] + [c * v.width for c in b0_widths for v in VARIANTS.values() if v.width]
    for c in requests:
        r = make_divisible(c)
        assert r % 8 == 0 and r >= 0.9 * c and r == _make_divisible(c, 8), c
    assert [make_divisible(c * 1.1) for c in b0_widths] == [32, 16, 24, 48, 88, 120, 208, 352, 1408]  # B2


@pytest.mark.parametrize("name", NAMES)
def test_depth_is_ceil_of_scaled_repeats(name):
    """Each stage has ceil(repeats x depth) blocks: 16 for B0 ... 55 for B7."""
    blocks = [n for n, _ in mbconv_blocks(skeleton(name))]
    assert len(blocks) == BLOCKS[name]
    per_stage = [sum(n[0] == str(s) for n in blocks) for s in range(1, 8)]
    assert per_stage == [math.ceil(r * VARIANTS[name].depth) for r in (1, 2, 2, 3, 3, 4, 1)]


@pytest.mark.parametrize("name", NAMES)
def test_squeeze_excite_width_is_a_quarter_of_block_input(name):
    """SE squeezes to block input channels // 4 (not expanded // 4) and excites the expanded width."""
    for _, block in mbconv_blocks(skeleton(name)):
        convs = [m for m in block.block.modules() if isinstance(m, nn.Conv2d)]
        cin, mid = convs[0].in_channels, block.block.dwconv[0].out_channels
        assert block.block.se.fc1.out_channels == max(1, cin // 4)
        assert block.block.se.fc1.in_channels == mid == block.block.se.fc2.out_channels
    b0 = skeleton("b0")
    assert b0.features.get_submodule("2a").block.se.fc1.out_channels == 16 // 4
    assert b0.features.get_submodule("1a").block.se.fc1.out_channels == 32 // 4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stochastic_depth_rises_linearly_to_0_2(name):
    """Drop-path probability of block i of n is 0.2 * i / n: 0 first, 0.2 * (n-1) / n last (V2:
    over its FusedMBConv and MBConv blocks together, as torchvision's)."""
    blocks = residual_blocks(skeleton(name))
    n = len(blocks)
    probs = [b.drop_path.p for _, b in blocks]
    assert probs == pytest.approx([0.2 * i / n for i in range(n)])
    assert probs[0] == 0 and probs[-1] == pytest.approx(0.2 * (n - 1) / n)


def test_fresh_residual_blocks_start_as_the_identity():
    """A fresh model's residual blocks pass their input through unchanged (their last BatchNorm
    scales by 0) while the other blocks compute; `zero_init_residual=False` gives every
    BatchNorm a scale of 1, as torchvision initialises it. Weights loaded from a file replace both."""
    torch.manual_seed(0)
    model = create_model("b0", num_classes=5).train()
    blocks = mbconv_blocks(model)
    x = {name: torch.randn(4, b.block[0][0].in_channels, 8, 8) for name, b in blocks}
    residual = [name for name, b in blocks if b.use_skip]
    assert len(residual) == 9
    for name, block in blocks:
        same = torch.equal(block(x[name]), x[name]) if block.use_skip else False
        assert same == block.use_skip, name

    plain = create_model("b0", num_classes=5, zero_init_residual=False)
    assert all(bn.weight.eq(1).all() for bn in plain.modules() if isinstance(bn, nn.BatchNorm2d))
    loaded = load_weights(create_model("b0", num_classes=5), plain.state_dict(), verbose=False)
    torch.testing.assert_close(loaded.state_dict(), plain.state_dict())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_classifier_dropout_per_variant(name):
    """Dropout before the classifier: 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5 for B0-B7; 0.2, 0.3,
    0.4 for V2-S/M/L."""
    model = skeleton(name)
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == DROPOUT[name]
    assert VARIANTS[name].dropout == DROPOUT[name]


# ---------------------------------------------------------------------------------------------
# 10. names
# ---------------------------------------------------------------------------------------------

def test_tutorial_calls_work():
    """The tutorial's `from model import efficientnet_b0 as create_model; create_model(num_classes=5)`
    and this repo's create_model(num_classes=5) both build a 5-class B0."""
    for build in (M.efficientnet_b0, create_model):
        model = build(num_classes=5)
        assert model.classifier[1].out_features == 5
        assert n_params(model) == PARAMS["b0"] - 1281 * (1000 - 5)  # B0; only the 1280-wide head is smaller


@pytest.mark.parametrize("spelling", ["b0", "B0", "efficientnet_b0", "efficientnet-b0", "v2_s", "V2-S",
                                      "efficientnet_v2_s", "EfficientNetV2-S"])
def test_model_name_spellings(spelling):
    """create_model accepts b0, B0, efficientnet_b0 and efficientnet-b0 alike, and so for V2."""
    with torch.device("meta"):
        model = create_model(spelling)
    assert n_params(model) == PARAMS["b0" if "0" in spelling else "v2_s"]
    assert M.title(spelling) == ("EfficientNet-B0" if "0" in spelling else "EfficientNetV2-S")


@pytest.mark.parametrize("bad", ["b8", "resnet50", "", "v2_x", "efficientnet_v3_s"])
def test_unknown_model_name_lists_choices(bad):
    """An unknown model name is a ValueError that lists b0 ... b7 and v2_s ... v2_l."""
    with pytest.raises(ValueError) as err:
        create_model(bad)
    assert all(name in str(err.value) for name in NAMES)
    assert not isinstance(err.value, WeightsError)  # a name is not a weights file


def test_drop_path_draws_as_torchvision_stochastic_depth():
    """Same seed, same samples dropped and the same scaling as torchvision.ops.StochasticDepth("row"),
    so a run is the same whichever of the two a model uses; identity in eval."""
    x = torch.randn(64, 3, 4, 4)
    ours, theirs = M.DropPath(0.3).train(), StochasticDepth(0.3, "row").train()
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    assert torch.equal(a, theirs(x))
    assert 0 < int((a.flatten(1) == 0).all(1).sum()) < 64
    assert ours.eval()(x) is x


# ---- EfficientNetV2 ----------------------------------------------------------------------------

V2_PARAMS = {"v2_s": 21_458_488, "v2_m": 54_139_356, "v2_l": 118_515_272}


@pytest.mark.parametrize("name", list(V2_PARAMS))
def test_v2_is_torchvisions_network_to_the_logit(name):
    """EfficientNetV2 S/M/L: the paper's parameter counts, torchvision's parameter names and shapes
    (its state dicts load with no renaming), and its logits for the same weights (random, with
    perturbed BatchNorm statistics) on a real photo at the variant's size, as torchvision's
    weights preprocess it."""
    import matplotlib
    ours = getattr(M, f"efficientnet_{name}")()
    theirs = randomise(getattr(torchvision.models, f"efficientnet_{name}")(), seed=3)
    assert sum(p.numel() for p in ours.parameters()) == V2_PARAMS[name]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict: every name and shape
    sd, info = read_weights(theirs.state_dict())
    assert (info["variant"], info["source"], info["bn_eps"], info["num_classes"]) == (name, "torchvision", 1e-3, 1000)
    assert all(torch.equal(sd[k], v) for k, v in theirs.state_dict().items())  # no renaming
    weights = getattr(torchvision.models, f"EfficientNet_{name.upper()}_Weights").IMAGENET1K_V1
    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    x = weights.transforms()(photo)[None]
    with torch.no_grad():
        expected, got = theirs(x), ours.eval()(x)
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()


def test_weights_of_one_family_into_the_other_is_one_line(b0_file):
    """A B0 file into an EfficientNetV2, or a V2 state dict into a B0: one line naming both and the
    --model to use; into a network of neither family, one line too."""
    path, _ = b0_file
    with pytest.raises(WeightsError, match=r"holds EfficientNet-B0 weights, not EfficientNetV2-S: use --model b0$"):
        load_weights(M.efficientnet_v2_s(), path)
    v2 = M.efficientnet_v2_s(num_classes=3).state_dict()
    with pytest.raises(WeightsError, match=r"holds EfficientNetV2-S weights, not EfficientNet-B0: use --model v2_s$"):
        load_weights(create_model("b0", num_classes=3), v2)
    with pytest.raises(WeightsError, match="not into a ResNet of another layout"):
        load_weights(torchvision.models.resnet18(), path)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_is_known_by_its_shapes(name):
    """weight_files tells a variant from the tables of model.py without building it; that is the
    variant the built network's state_dict is read as."""
    with torch.device("meta"):
        sd = efficientnet(name, num_classes=7).state_dict()
    assert weight_files.variant_of(sd) == name
