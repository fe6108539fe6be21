"""The GPU paths on an NVIDIA GPU: the lean Functions of activations.py against plain autograd under bf16
and fp16 autocast, the lean path's memory, train.py's GPU options end to end, predict.py and
benchmark.py on cuda, and with two GPUs: NCCL with --sync-bn, --device cuda:1, and resuming on
another number of GPUs. Skipped as a whole where PyTorch sees no CUDA GPU.

    python -m pytest -q tests/test_cuda.py

Each test takes seconds on one GPU, the --compile runs and benchmark.py a few minutes."""
import copy
import csv
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import activations
from conftest import FAST, ROOT, copy_digits, run_script
from model import efficientnet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

CUDA = torch.device("cuda")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def skip_without_native_bf16(amp):
    """bf16 runs natively from compute capability 8.0 (Ampere) on; older GPUs emulate it slowly."""
    if amp == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16 (capability < 8.0)")


# ---------------------------------------------------------------------------------------------
# activations.py's lean Functions on the GPU
# ---------------------------------------------------------------------------------------------

def b0_pair():
    """The same B0 twice, in channels-last on the GPU: lean (the default) and plain autograd. No
    dropout or stochastic depth, so both see the same numbers; random BatchNorm scales and shifts,
    so a mistake with either shows."""
    torch.manual_seed(0)
    lean = efficientnet("b0", dropout=0.0, drop_path_rate=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lean.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    plain = efficientnet("b0", dropout=0.0, drop_path_rate=0.0, lean=False)
    plain.load_state_dict(lean.state_dict())
    return [m.to(CUDA, memory_format=torch.channels_last).train() for m in (lean, plain)]


def train_step(model, x, y, dtype=None, loss_scale=1.0):
    """(loss, {name: gradient in fp32}) of one training step under `dtype` autocast (None: off).
    The loss is multiplied by `loss_scale` for backward and the gradients divided again, as
    train.py's GradScaler does for fp16, where small gradients would otherwise underflow."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    (loss * loss_scale).backward()
    return loss.detach().float(), {n: p.grad.float() / loss_scale for n, p in model.named_parameters()}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_lean_matches_plain_under_autocast_in_channels_last(amp):
    """train.py's default on a GPU (autocast, channels-last): the lean path's loss, gradients and BN
    statistics are plain autograd's within half precision, and lean is no further from float64
    (the yardstick: no TF32, no rounding to speak of) than plain is."""
    skip_without_native_bf16(amp)
    dtype = HALF[amp]
    lean, plain = b0_pair()
    reference = copy.deepcopy(plain).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 64, 64, generator=g).to(CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (8,), generator=g).to(CUDA)
    flat = lambda grads: torch.cat([grads[k].flatten() for k in sorted(grads)])  # noqa: E731
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    exact = flat(train_step(reference, x.double(), y)[1])
    scale = 1024.0 if dtype == torch.float16 else 1.0
    loss_lean, grads_lean = train_step(lean, x, y, dtype, scale)
    loss_plain, grads_plain = train_step(plain, x, y, dtype, scale)
    torch.testing.assert_close(loss_lean, loss_plain, rtol=2e-2, atol=1e-3)
    g_lean, g_plain = flat(grads_lean), flat(grads_plain)
    assert all(torch.isfinite(g).all() for g in (g_lean, g_plain))
    tolerance = {"bf16": 0.05, "fp16": 0.02}[amp]  # bf16 keeps 8 significant bits, fp16 11
    assert rel(g_lean, g_plain) < tolerance, (rel(g_lean, g_plain), rel(g_plain, exact))
    assert rel(g_lean, exact) <= 1.25 * rel(g_plain, exact) + 1e-4, (rel(g_lean, exact), rel(g_plain, exact))
    for (key, a), b in zip(lean.named_buffers(), plain.buffers()):  # running mean/var, batches counted
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3, msg=key)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_lean_functions_pass_gradcheck_on_cuda(memory_format):
    """Both hand-written backwards agree with finite differences in float64 with the GPU's kernels
    (BatchNorm has its own channels-last kernels there)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=g).mul(2).add(1)
    x = x.to(CUDA).contiguous(memory_format=memory_format).requires_grad_()
    weight = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).to(CUDA).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=g).to(CUDA).requires_grad_()
    stats = torch.zeros(4, dtype=torch.float64, device=CUDA), torch.ones(4, dtype=torch.float64, device=CUDA)
    assert torch.autograd.gradcheck(lambda *t: activations.BatchNormSiLU.apply(*t, *stats, 0.1, 1e-3), (x, weight, bias))
    z = torch.randn(3, 4, 1, 1, dtype=torch.float64, generator=g).to(CUDA).requires_grad_()
    assert torch.autograd.gradcheck(activations.SigmoidGate.apply, (x, z))


@pytest.mark.parametrize("amp", ["off", "half"])
def test_lean_training_step_peaks_lower_than_plain(amp):
    """What the lean path is for: B0 at 224 px, batch 16, channels-last, one training step in fp32
    and in the GPU's half precision (bf16 from Ampere on, else fp16). On a CPU the lean path keeps
    0.62x the activations; the step's peak, backward's temporaries included, stays below 0.8x."""
    dtype = None if amp == "off" else torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 224, 224, generator=g).to(CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (16,), generator=g).to(CUDA)

    def step_peak_mib(lean):
        model = efficientnet("b0", lean=lean).to(CUDA, memory_format=torch.channels_last).train()
        train_step(model, x, y, dtype)  # warm-up: cuDNN and cuBLAS workspaces, first-call allocations
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, x, y, dtype)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    lean, plain = step_peak_mib(True), step_peak_mib(False)
    assert lean < 0.8 * plain, f"lean {lean:.0f} MiB, plain {plain:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# train.py, predict.py and benchmark.py with --device cuda
# ---------------------------------------------------------------------------------------------

def read_metrics(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def batches_counted(run):
    """How many training batches the stem's BatchNorm counted, from last.pth (precise-BN keeps
    the count; a checkpointed recomputation that counted again would double it)."""
    last = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    return int(last["model"]["features.stem_conv.1.num_batches_tracked"])


SMOKE = {
    "fp16-clip-accum-checkpointing": ["--amp", "fp16", "--clip-grad", "1", "--grad-accum", "2", "--grad-checkpointing"],
    "bf16": ["--amp", "bf16"],
    "compile": ["--compile"],
    "compile-checkpointing": ["--compile", "--grad-checkpointing"],
}


@pytest.mark.parametrize("flags", SMOKE.values(), ids=SMOKE.keys())
def test_train_on_cuda(flags, tmp_path):
    """Two epochs on a tiny digits folder with train.py's GPU options: every epoch logged with finite
    losses, best.pth finite, and each training batch counted once in the BatchNorm statistics."""
    if "bf16" in flags:
        skip_without_native_bf16("bf16")
    data = copy_digits(tmp_path / "tiny")
    run = tmp_path / "run"
    out = run_script("train.py", "--data-path", data, "--output-dir", run, "--device", "cuda", *FAST, *flags,
                     timeout=900).stdout
    assert "device cuda" in out, out
    if "--amp" in flags:
        amp = flags[flags.index("--amp") + 1]
        assert f"amp {str(HALF[amp]).split('.')[-1]}" in out, out
    if "--grad-accum" in flags:
        assert "global batch 16" in out, out  # 8 images x 2 micro-batches
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss")), rows
    best = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    train_images = int(re.search(r"(\d+) train / \d+ val images", out).group(1))
    assert batches_counted(run) == 2 * (train_images // 8)  # 2 epochs of whole batches of 8


def test_predict_on_cuda_matches_cpu(tiny_run):
    """predict.py gives the same probabilities on the GPU as on the CPU for the same best.pth, to
    TF32's precision (PyTorch's default for cuDNN convolutions, ~3 significant digits)."""
    data, run, _ = tiny_run

    def probabilities(device):
        out = run_script("predict.py", data, "--weights", run / "best.pth", "--topk", "3", "--json",
                         "--device", device).stdout
        return {r["path"]: {t["class"]: t["prob"] for t in r["topk"]} for r in map(json.loads, out.splitlines())}

    cpu, cuda = probabilities("cpu"), probabilities("cuda")
    assert cpu.keys() == cuda.keys() and len(cpu) == 30  # copy_digits: 3 classes of 10
    for path in cpu:
        assert cpu[path].keys() == cuda[path].keys() == {"0", "1", "2"}
        for c in cpu[path]:
            assert abs(cuda[path][c] - cpu[path][c]) <= 5e-3, (path, c, cuda[path][c], cpu[path][c])


def test_benchmark_runs_every_row_on_cuda():
    """benchmark.py --device cuda at a toy size (test_performance.py runs it on the CPU): every
    contender's process runs on the GPU and every row has a positive figure on both sides."""
    out = run_script("benchmark.py", "--device", "cuda", "--img-size", "32", "--batch-size", "2", "--steps", "1",
                     "--rounds", "1", "--workers", "0", timeout=900).stdout
    assert re.search(r"^EfficientNet-B0 at 32px, batch 2, cuda", out, re.M), out
    rows = re.findall(r"^(.+?)\s+([\d.]+)\s+([\d.]+)\s+(img/s|MiB)\s+([\d.]+)x$", out, re.M)
    names = [r[0] for r in rows]
    onnx = "no ONNX row" not in out  # the ONNX row needs requirements-export.txt
    expected = ["train step: train.py default vs tutorial loop", "peak tensor memory of a training step",
                "peak tensor memory, --grad-checkpointing", "inference: predict.py vs torchvision eager",
                "predict.py over 20 JPEGs", "inference: export.py .pt2"] + ["inference: export.py .onnx"] * onnx
    for row in expected:
        assert any(n.startswith(row) for n in names), (row, out)
    assert len(rows) == 16 + onnx, out
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[4]) > 0 for r in rows), out


def test_auto_amp_is_bf16_from_ampere_on_else_fp16():
    """--amp auto on a GPU: bf16 where it runs natively (compute capability 8.0 and later), fp16
    before that."""
    from runtime import amp_dtype
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert amp_dtype("auto", torch.device("cuda")) == expected


# ---------------------------------------------------------------------------------------------
# several processes, several GPUs
# ---------------------------------------------------------------------------------------------

# Runs train.py's main() as train.py's __main__ does, then writes what this process saw to
# SPY_DIR/rank<RANK>.json: the BatchNorm classes of the model it trained, how many training
# forwards it ran and how many batches its stem BatchNorm counted, whether it ever made a CUDA
# context on GPU 0 (as cudaSetDevice or pinned memory would) and its peak allocation on each GPU.
SPY = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    import torch, train
    seen = {{"forwards": 0}}
    build_model = train.build_model
    def spied_build_model(*args, **kwargs):
        models = build_model(*args, **kwargs)
        def count(module, inputs):
            seen["forwards"] += module.training and torch.is_grad_enabled()
        models.raw.register_forward_pre_hook(count)
        seen["raw"] = models.raw
        return models
    train.build_model = spied_build_model
    parser = train.get_args_parser()
    args = parser.parse_args()
    train.check_args(parser, args)
    code = train.main(args, parser)
    raw = seen.pop("raw")
    seen["norms"] = sorted({{type(m).__name__ for m in raw.modules()
                             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}})
    seen["counted"] = int(raw.features.stem_conv[1].num_batches_tracked)
    if torch.cuda.is_available():
        seen["context_on_gpu0"] = bool(torch._C._cuda_hasPrimaryContext(0))  # asked first: it makes none
        seen["peak_mib"] = [torch.cuda.max_memory_allocated(i) / 2**20 for i in range(torch.cuda.device_count())]
    with open(os.path.join({spy_dir!r}, f"rank{{os.environ.get('RANK', '0')}}.json"), "w") as f:
        json.dump(seen, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
""")


def spy_train(tmp_path, *args, processes=1, env=None):
    """train.py through SPY, with torchrun when processes > 1: (CompletedProcess, {rank: what it saw})."""
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir(exist_ok=True)
    script = tmp_path / "spy_train.py"
    script.write_text(SPY.format(root=ROOT, spy_dir=str(spy_dir)))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    result = subprocess.run([sys.executable, *launcher, str(script), *map(str, args)], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {}
    for name in os.listdir(spy_dir):
        with open(spy_dir / name) as f:
            seen[int(name[4:-5])] = json.load(f)
    return result, seen


@two_gpus
@pytest.mark.parametrize("flags", [[], ["--grad-checkpointing"]], ids=["sync-bn", "sync-bn-checkpointing"])
def test_torchrun_nccl_with_sync_bn(flags, tmp_path):
    """torchrun on two GPUs (NCCL) with --sync-bn: both ranks train SyncBatchNorm layers, and each
    counts every training batch once, also when checkpointed blocks recompute them in backward."""
    data = copy_digits(tmp_path / "data")
    result, seen = spy_train(tmp_path, "--data-path", data, "--output-dir", tmp_path / "run", "--device", "cuda",
                             *FAST, "--sync-bn", *flags, processes=2)
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 2/2") == 1, result.stdout
    assert sorted(seen) == [0, 1]
    for rank in seen.values():
        assert rank["norms"] == ["SyncBatchNorm"]
        assert rank["forwards"] > 0 and rank["counted"] == rank["forwards"], rank
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "run")] == [1, 2]


@two_gpus
def test_device_cuda_1_leaves_gpu_0_alone(tmp_path):
    """--device cuda:1 trains on the second GPU without a CUDA context or a byte of memory on the
    first (a context alone holds hundreds of MiB of someone else's GPU). Checked from inside the
    training process itself: no process listing is needed, and other users of GPU 0 do not count."""
    data = copy_digits(tmp_path / "data")
    result, seen = spy_train(tmp_path, "--data-path", data, "--output-dir", tmp_path / "run", "--device", "cuda:1",
                             *FAST)
    assert "device cuda:1" in result.stdout, result.stdout
    process = seen[0]
    assert process["forwards"] > 0 and process["peak_mib"][1] > 0, process
    assert process["peak_mib"][0] == 0 and not process["context_on_gpu0"], process


def test_torchrun_on_cpu_on_a_gpu_host(tmp_path):
    """torchrun --device cpu where GPUs are present: the processes talk over gloo and train on
    the CPU (NCCL carries only GPU tensors), as on a machine without GPUs."""
    data = copy_digits(tmp_path / "data")
    result, seen = spy_train(tmp_path, "--data-path", data, "--output-dir", tmp_path / "run", "--device", "cpu",
                             *FAST, processes=2)
    assert "device cpu x 2 processes" in result.stdout, result.stdout
    assert sorted(seen) == [0, 1] and all(rank["peak_mib"] == [0] * len(rank["peak_mib"]) for rank in seen.values())
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "run")] == [1, 2]


@two_gpus
def test_resume_on_one_gpu_what_two_started(tmp_path):
    """A run saved by torchrun on two GPUs resumes with plain python on one (CUDA_VISIBLE_DEVICES
    0,1 then 0): last.pth holds two GPUs' random states, and the resumed run goes on from epoch 2."""
    data = copy_digits(tmp_path / "data")
    run = tmp_path / "run"
    result, _ = spy_train(tmp_path, "--data-path", data, "--output-dir", run, "--device", "cuda", *FAST,
                          "--epochs", "1", processes=2, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert "x 2 processes" in result.stdout, result.stdout
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(run / "last.pth"),
                              "--epochs", "2"], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "epoch 2/2" in resumed.stdout and "epoch 1/2" not in resumed.stdout, resumed.stdout
    assert [int(r["epoch"]) for r in read_metrics(run)] == [1, 2]
