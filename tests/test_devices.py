"""Devices: GPU, Apple GPU and CPU paths, torchrun's backends and AMP's dtype, without a GPU."""
import argparse
import subprocess
import types

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import benchmark
from benchmarks import steps
import conftest
import errors
import export
import predict
import runtime
import train
import utils
from conftest import FakeGPUs, copy_digits


# torch.cuda is replaced in this process by FakeGPUs (conftest.py: a machine with N GPUs of some
# compute capability, recording what is asked of it), and OnCPU runs on the CPU the tensors that
# code puts on "cuda" or "mps", recording what it put there. What only a real GPU can show
# (kernels, NCCL, memory) is tests/test_cuda.py's.


class OnCPU(TorchFunctionMode):
    """Tensors asked for on a `kind` device ("cuda" or "mps"), made or moved there, are made on the
    CPU instead; `made` lists the dtype of each."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.made = kind, []

    def elsewhere(self, device):
        return isinstance(device, (str, torch.device)) and torch.device(device).type == self.kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = list(args), dict(kwargs or {})
        if self.elsewhere(kwargs.get("device")):
            kwargs["device"] = "cpu"
            self.made.append(kwargs.get("dtype"))
        if func is torch.Tensor.to and len(args) > 1 and self.elsewhere(args[1]):
            args[1] = "cpu"
            self.made.append(kwargs.get("dtype", args[0].dtype))
        return func(*args, **kwargs)


@pytest.fixture
def cuda_flags():
    """The process-wide numerics that configure_cuda sets, put back after the test."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before[:2]
    torch.set_float32_matmul_precision(before[2])


class Reached(Exception):
    """Raised by a stand-in to stop a script's main at a point of interest."""


# ---- 1. benchmark.py --device cuda: the exported rows ------------------------------------------

def test_benchmark_exports_on_the_cpu_as_export_py_does(monkeypatch):
    """With the model on the GPU, export built its example input on the CPU and the exported rows
    crashed (device mismatch). The program is exported from the CPU, as export.py does, then
    loaded onto the device (a device with no memory stands in for the GPU here)."""
    seen = []

    def spy(model, crop, dynamic_batch):
        seen.append(next(model.parameters()).device)
        raise Reached

    monkeypatch.setattr(export, "export_program", spy)
    with pytest.raises(Reached):
        steps.infer_exported(argparse.Namespace(model="b0"), torch.device("meta"),
                                 torch.empty(2, 3, 32, 32, device="meta"), "pt2")
    assert seen == [torch.device("cpu")]


# ---- 2, 8. the device, then torchrun's backend; the current GPU ------------------------------

def start_train(monkeypatch, flags, gpus, local_rank, local_world):
    """train.main under torchrun (this process being local_rank of local_world, on a machine with
    `gpus` GPUs) up to loading the data: [events], where events are FakeGPUs' and
    ("init_process_group", backend, device_id)."""
    fake = FakeGPUs(monkeypatch, gpus)
    for name, value in (("RANK", local_rank), ("WORLD_SIZE", local_world), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", local_world)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: fake.events.append(
        ("init_process_group", backend, kw.get("device_id"))))
    monkeypatch.setattr(dist, "get_rank", lambda *a: local_rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: local_world)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: False)  # not in the test's own process

    def build_data(args, device, *rest):
        fake.events.append(("device", device))
        raise Reached

    monkeypatch.setattr(train, "build_data", build_data)
    parser = train.get_args_parser()
    with pytest.raises(Reached):
        train.main(parser.parse_args(["--workers", "0", *flags]), parser)
    return fake.events


def test_torchrun_on_the_cpu_of_a_gpu_machine_uses_gloo(monkeypatch, cuda_flags):
    """--device cpu under torchrun took NCCL and GPU LOCAL_RANK whenever CUDA existed: two
    processes on a one-GPU machine died with "invalid device ordinal"."""
    events = start_train(monkeypatch, ["--device", "cpu"], gpus=1, local_rank=1, local_world=2)
    assert events == [("init_process_group", "gloo", None), ("device", torch.device("cpu"))]


def test_torchrun_on_gpus_sets_the_device_then_nccl(monkeypatch, cuda_flags):
    events = start_train(monkeypatch, [], gpus=2, local_rank=1, local_world=2)
    cuda1 = torch.device("cuda", 1)
    assert events == [("set_device", 1), ("init_process_group", "nccl", cuda1), ("device", cuda1)]
    assert torch.backends.cudnn.benchmark  # training shapes are fixed: cuDNN picks its fastest kernels


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch, cuda_flags):
    with pytest.raises(errors.UsageError, match=r"torchrun starts 2 processes on this machine, but it has 1 GPU\(s\): "
                                             r"use --nproc_per_node=1, or --device cpu"):
        start_train(monkeypatch, [], gpus=1, local_rank=1, local_world=2)


@pytest.mark.parametrize("name, index", [("cuda:1", 1), ("cuda", 0), ("auto", 0)])
def test_the_gpu_chosen_becomes_the_current_one(monkeypatch, name, index):
    """--device cuda:1 left GPU 0 current: CUDA's context and the pin-memory thread went there."""
    fake = FakeGPUs(monkeypatch, 2)
    assert runtime.choose_device(name) == torch.device("cuda", index)
    assert fake.events == [("set_device", index)]


def test_a_device_that_cannot_train_is_refused():
    with pytest.raises(errors.UsageError, match="--device meta is not a device to train or predict on"):
        runtime.choose_device("meta")


def test_benchmark_measures_the_gpu_it_runs_on(monkeypatch, cuda_flags):
    """benchmark.py --device cuda:1 synchronised with, and read the memory of, GPU 0."""
    fake = FakeGPUs(monkeypatch, 2)
    args = benchmark.get_args_parser().parse_args(["--img-size", "32", "--batch-size", "2", "--steps", "1",
                                                   "--device", "cuda:1"])
    with OnCPU("cuda"):
        device = runtime.choose_device(args.device)
        steps.measure("infer-baseline", args, device)
    assert fake.events and all(index == 1 for _, index in fake.events), fake.events


# ---- 5. --amp auto and predict.py --amp on GPUs without native bf16 ---------------------------

@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_amp_auto_is_bf16_only_where_native(monkeypatch, capability, dtype):
    """is_bf16_supported() counts emulation: a T4 (7.5) trained in emulated bf16. There, auto is
    fp16, and train.py's grad scaler comes on with it."""
    FakeGPUs(monkeypatch, 1, capability)
    device = torch.device("cuda", 0)
    assert runtime.amp_dtype("auto", device) == dtype
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(amp="auto", optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0,
                              epochs=1, lrf=0.01, grad_accum=1)
    _, _, scaler = train.build_optimization(args, train.Models(model, model, model, None), 1, device, None)[0]
    assert scaler.is_enabled() == (dtype == torch.float16)
    assert runtime.amp_dtype("auto", torch.device("cpu")) is None


@pytest.mark.parametrize("device, capability, dtype", [("cuda:0", (7, 0), torch.float16),
                                                       ("cuda:0", (9, 0), torch.bfloat16),
                                                       ("cpu", None, torch.bfloat16)])
def test_predict_amp_takes_the_fast_dtype_of_the_device(monkeypatch, device, capability, dtype):
    FakeGPUs(monkeypatch, 1, capability)
    used = []
    real_autocast = torch.autocast

    def autocast(device_type, dtype=None, enabled=True):
        used.append((device_type, dtype, enabled))
        return real_autocast("cpu", enabled=False)

    monkeypatch.setattr(torch, "autocast", autocast)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    loader = [([0, 1], torch.randn(2, 3, 4, 4), [])]
    with OnCPU("cuda"):
        results = list(predict.predict(model, loader, torch.device(device), topk=2, amp=True))
    assert len(results) == 2 and used == [(torch.device(device).type, dtype, True)]


# ---- 6. Apple GPUs (MPS) have no float64 -------------------------------------------------------

def tiny_epoch_args():
    return argparse.Namespace(amp="off", grad_accum=1, clip_grad=0, channels_last=False, img_size=64,
                              log_interval=30)


def test_nothing_in_float64_is_made_on_an_apple_gpu():
    """The end of the first epoch made float64 tensors on the device (evaluate's sums, the epoch's
    mean loss), which MPS does not have: `--device auto` on a Mac failed there."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    data = [(torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4,))) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    mps = torch.device("mps")
    with OnCPU("mps") as on_mps:
        loss = utils.train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, data, mps, 1, tiny_epoch_args(),
                                     scheduler, torch.amp.GradScaler("mps", enabled=False), show=False).loss
        result = utils.evaluate(model, data, mps, 3, show=False)
    assert 0 < loss < 10 and result["confusion"].sum() == 12
    assert on_mps.made and torch.float64 not in on_mps.made, on_mps.made


# ---- the training loop does not wait for the GPU at every step --------------------------------

class Reads(TorchFunctionMode):
    """Counts the reads of a tensor's value by the host (each one waits for the device)."""
    READS = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


class DivergesAt(torch.nn.Module):
    """A linear layer whose output becomes NaN from its `step`-th training call on."""

    def __init__(self, step):
        super().__init__()
        self.linear, self.step, self.calls = torch.nn.Linear(4, 3), step, 0

    def forward(self, x):
        self.calls += 1
        out = self.linear(x)
        return out * float("nan") if self.calls > self.step else out


def run_epoch(model, device, batches=12):
    torch.manual_seed(0)
    data = [(torch.randn(2, 4), torch.randint(0, 3, (2,))) for _ in range(batches)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return utils.train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, data, device, 1, tiny_epoch_args(),
                                 scheduler, torch.amp.GradScaler("cpu", enabled=False), show=False)


def test_the_loss_is_read_back_from_a_gpu_every_few_steps_not_every_step(monkeypatch):
    """loss.item() on every micro-batch made the host wait for the GPU at every step."""
    FakeGPUs(monkeypatch, 1)
    with OnCPU("cuda"), Reads() as reads:
        loss = run_epoch(DivergesAt(step=10**9), torch.device("cuda", 0)).loss
    assert 0 < loss < 10 and reads.count <= 4, reads.count  # the epoch's last check, its mean and rate


def test_a_nan_loss_stops_the_epoch_at_its_step_on_a_cpu_and_soon_after_on_a_gpu(monkeypatch):
    model = DivergesAt(step=3)
    with pytest.raises(errors.NonFiniteLossError, match=r"^the loss became nan in epoch 1, step 3$"):
        run_epoch(model, torch.device("cpu"))
    assert model.calls == 4

    FakeGPUs(monkeypatch, 1)
    monkeypatch.setattr(utils, "CHECK_EVERY", 5)
    model = DivergesAt(step=3)
    with OnCPU("cuda"), pytest.raises(errors.NonFiniteLossError, match=r"^the loss became nan in epoch 1, steps 0-4$"):
        run_epoch(model, torch.device("cuda", 0))
    assert model.calls == 5


# ---- 10. the tests run the scripts on the CPU on a GPU machine too ----------------------------

def test_run_script_runs_the_scripts_on_the_cpu_unless_told(monkeypatch):
    """On a GPU machine the comparisons with CPU references (TTA, export parity, torchvision)
    ran their subprocess on CUDA with TF32."""
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(cmd) or types.SimpleNamespace(
        returncode=0, stdout="", stderr=""))
    conftest.run_script("train.py", "--epochs", 1, process=True)
    conftest.run_script("predict.py", "x.jpg", "--device", "cuda", process=True)
    conftest.run_script("export.py", "--weights", "best.pth", process=True)  # takes no --device
    assert [c[2:] for c in commands] == [["--epochs", "1", "--device", "cpu"], ["x.jpg", "--device", "cuda"],
                                         ["--weights", "best.pth"]]


# ---- 11. under torchrun, a share of the data smaller than the batch -----------------------------

def test_a_share_smaller_than_the_batch_is_refused(tmp_path, monkeypatch):
    """drop_last was decided on the whole set: 24 training images over 2 processes gave each 12,
    dropped whole as an incomplete batch of 16. No process trained, and nothing said so."""
    data = copy_digits(tmp_path / "data", per_class=10)  # 3 classes: 24 training images
    monkeypatch.setattr(runtime, "world_size", lambda: 2)
    parser = train.get_args_parser()
    args = parser.parse_args(["--data-path", data, "--img-size", "32", "--workers", "0", "--batch-size", "16",
                              "--precise-bn", "0"])
    with pytest.raises(errors.DataError, match=r"^24 training images shared by 2 processes leave 12 to each, fewer "
                                            r"than --batch-size 16: use --batch-size 12 or fewer processes$"):
        train.build_data(args, torch.device("cpu"))
    args.batch_size = 12
    assert len(train.build_data(args, torch.device("cpu")).train_loader) == 1
    args.batch_size, args.eval_only = 16, True  # nothing trains: validation alone is fine
    assert len(train.build_data(args, torch.device("cpu")).val_loader) == 1


# ---- likely slow on a GPU ---------------------------------------------------------------------

class Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_an_ema_update_is_a_few_kernels_and_never_waits_for_the_gpu():
    """The EMA update was one lerp_ per tensor (360 for B0) and read its count back from the
    device (float(), and AveragedModel's own two reads) at every step. The averages are the same,
    bit for bit, as the per-tensor update's."""
    parser = train.get_args_parser()
    models = train.build_model(parser.parse_args(["--workers", "0"]), 3, None, torch.device("cpu"))
    raw, ema = models.raw, models.ema
    expected = [t.clone() for t in (*raw.parameters(), *raw.buffers())]
    for n in range(3):
        with torch.no_grad():
            for p in raw.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for m in raw.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.num_batches_tracked += 1
        weight = 1 - min(0.999, 1 - (1 + n) ** -0.75)
        for e, c in zip(expected, (*raw.parameters(), *raw.buffers())):  # the per-tensor update, n updates done
            if n == 0 or not e.is_floating_point():
                e.copy_(c)
            else:
                e.lerp_(c.detach(), weight)
        if n == 0:
            ema.update_parameters(models.train)  # the first: reads the count of a resumed run once
            continue
        with Calls() as calls:
            ema.update_parameters(models.train)
        assert not set(calls.names) & set(Reads.READS), calls.names
        assert sum("lerp" in name or "copy" in name for name in calls.names) <= 2, len(calls.names)
    assert all(torch.equal(e, a) for e, a in zip(expected, (*ema.module.parameters(), *ema.module.buffers())))
    assert int(ema.n_averaged) == 3


class ImageMoves(TorchFunctionMode):
    """Counts the image batches (4-d tensors) moved with .to()."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.Tensor.to and args[0].dim() == 4
        return func(*args, **(kwargs or {}))


def test_precise_bn_copies_each_image_batch_to_the_device_once():
    """It passed the images as labels too: each batch went to the GPU twice."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    data = [(torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))) for _ in range(3)]
    with ImageMoves() as moves:
        utils.precise_bn(model, data, torch.device("cpu"), show=False)
    assert moves.count == 3


def test_loader_workers_are_shared_among_the_processes_of_a_machine(monkeypatch):
    """Each torchrun process took min(CPUs, 8) loader workers: 8 GPUs on 32 CPUs ran 64."""
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 32)
    assert runtime.default_workers() == 8
    for name, value in (("RANK", 0), ("WORLD_SIZE", 16), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 8)):
        monkeypatch.setenv(name, str(value))
    assert runtime.default_workers() == 4


@pytest.mark.parametrize("train_, benchmark_, tf32, matmul", [(True, True, True, "high"),
                                                               (False, False, False, "highest")])
def test_the_numerics_on_a_gpu_are_set_in_one_place(cuda_flags, train_, benchmark_, tf32, matmul):
    """Training: cuDNN's autotuner and TF32; prediction: fp32 as on a CPU. A CPU run changes nothing."""
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = not benchmark_, not tf32
    runtime.configure_cuda(torch.device("cpu"), train=train_)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == (not benchmark_, not tf32)
    runtime.configure_cuda(torch.device("cuda", 0), train=train_)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == (benchmark_, tf32)
    assert torch.get_float32_matmul_precision() == matmul


# device strings a user may type on a machine with no GPU, and the words the one line must hold
NO_SUCH_DEVICE = [("mps", "no Apple GPU (MPS) here"), ("cuda", "no CUDA GPU here"), ("cuda:3", "no CUDA GPU here"),
                  ("xpu", "not a device"), ("mps:1", "not a device"), ("cpu:1", "not a device"),
                  ("cuda:-1", "not a device"), ("garbage", "not a device"), ("", "not a device")]


@pytest.mark.parametrize("script", ["train.py", "predict.py"])
def test_every_device_this_machine_lacks_gets_one_line_in_every_script(script, tiny_run):
    """Each device string that cannot be used here ends the script with one line naming --device
    and what to use, exit 2, before anything is read or written (--device mps was a traceback)."""
    _, run, _ = tiny_run
    args = (["--output-dir", run.parent / "never-made"] if script == "train.py"
            else ["x.jpg", "--weights", run / "best.pth"])
    lacking = [(device, words) for device, words in NO_SUCH_DEVICE
               if not ("CUDA" in words and torch.cuda.is_available() or "MPS" in words and torch.backends.mps.is_available())]
    for device, words in lacking:
        result = conftest.run_script(script, *args, "--device", device, check=False)
        assert result.returncode == 2, (device, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: --device {device}") \
            and words in result.stderr and "Traceback" not in result.stderr, (device, result.stderr)
    assert not (run.parent / "never-made").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_benchmark_refuses_a_device_this_machine_lacks_in_one_line():
    result = conftest.run_script("benchmark.py", "--device", "mps", "--steps", "1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --device mps, but PyTorch sees no Apple GPU (MPS) here: "
                                                  "use --device cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU: the quick benchmark runs there")
def test_the_quick_gpu_benchmark_without_a_gpu_is_one_line():
    result = conftest.run_script("benchmark.py", "--device", "cuda", "--quick", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: --device cuda, but PyTorch sees no CUDA GPU here: use "
                                                  "--device cpu"]


def test_loader_workers_default_to_the_cpus_feeding_a_gpu_and_up_to_8_on_a_cpu(monkeypatch):
    """Feeding a GPU, every CPU but the one the process needs, no more than a batch; computing on the
    CPU, the CPUs up to 8; torchrun's processes on one machine share them."""
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 32)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert runtime.default_workers(gpu, 256) == 31 and runtime.default_workers(gpu, 16) == 16
    assert runtime.default_workers(cpu, 256) == 8 and runtime.default_workers() == 8
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    assert runtime.default_workers(gpu, 256) == 7 and runtime.default_workers(cpu, 16) == 8
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
    assert runtime.default_workers(gpu, 256) == 1 and runtime.default_workers(cpu, 16) == 1
