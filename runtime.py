"""Where and how the scripts run: the device and mixed precision, data loader workers and the C
allocator, torchrun's processes, and RNG state. In a single process the distributed helpers are
no-ops, so the training loop reads the same with one process or many.

    device = runtime.choose_device("auto", *runtime.torchrun_local())  # cuda > mps > cpu
    runtime.configure_cuda(device, train=True)
    rank, world, local_rank = runtime.setup_distributed(device)       # (0, 1, 0) without torchrun
"""
import ctypes
import datetime
import os
import random
import signal
import sys

import torch
import torch.distributed as dist

import outputs
from errors import UsageError


def check_torchvision():
    """Import torchvision, or say in one line that it does not fit this torch. A torchvision built
    for another torch release (or for CUDA beside a CPU-only torch) fails at import with "operator
    torchvision::nms does not exist", which says nothing about the cause or the fix."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, AttributeError, OSError) as e:
        from importlib import metadata
        try:
            vision = metadata.version("torchvision")
        except metadata.PackageNotFoundError:
            raise UsageError("torchvision is not installed: pip install -r requirements.txt") from None
        release = torch.__version__.split("+")[0]
        major, minor = (int(part) for part in release.split(".")[:2])
        matching = f"0.{minor + 15}.*" if major == 2 else "the matching release"  # torch 2.N ships with 0.(N+15)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"torchvision {vision} does not work with torch {torch.__version__} ({reason}): install "
                         f"both from one index, e.g. pip install --force-reinstall torch=={release} "
                         f"\"torchvision=={matching}\" --index-url https://download.pytorch.org/whl/cpu (or the "
                         "index of your CUDA version)") from None


def choose_device(name, local_rank=0, local_world=1):
    """--device: auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps; under torchrun (local_rank of
    local_world processes on this machine) the local rank's GPU. A GPU chosen is made the current
    one: CUDA's context, the pin-memory thread and torch.cuda's calls without a device then act on
    it, not on GPU 0."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps") or device.type != "cuda" and device.index:
        raise UsageError(f"--device {name} is not a device to train or predict on: use auto, cpu, cuda, "
                         "cuda:1 or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps, but PyTorch sees no Apple GPU (MPS) here: use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}, but PyTorch sees no CUDA GPU here: use --device cpu")
        count = torch.cuda.device_count()
        if local_world > count:
            raise UsageError(f"torchrun starts {local_world} processes on this machine, but it has {count} GPU(s): "
                             f"use --nproc_per_node={count}, or --device cpu")
        if local_world > 1 and device.index is not None:
            raise UsageError(f"--device {name} would put all {local_world} processes on one GPU: use --device cuda "
                             "(each process takes the GPU of its local rank)")
        if (device.index or 0) >= count:
            raise UsageError(f"--device {name}: only {count} GPU(s) here")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def native_bf16(device):
    """True on GPUs that compute in bf16 natively: compute capability 8 and up (A100, RTX 30xx and
    later). torch.cuda.is_bf16_supported() also counts older GPUs (T4, V100, RTX 20xx), which only
    emulate it, far slower than fp16."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def half_dtype(device):
    """The 16-bit float to compute in on `device`: fp16 on GPUs that lack native bf16 (fast there,
    where bf16 is emulated), bf16 everywhere else."""
    return torch.float16 if device.type == "cuda" and not native_bf16(device) else torch.bfloat16


def amp_dtype(mode, device):
    """The autocast dtype for --amp MODE ("auto", "bf16", "fp16", "off") on `device`, or None for fp32.
    auto is bf16 on GPUs that have it natively, fp16 (with train.py's grad scaler) on older GPUs,
    and fp32 elsewhere: on CPUs bf16 training measured slower than fp32 at 64-224 px, with AMX
    (Intel Xeon: 0.58x at 64 px, 0.95x at 224 px) and without."""
    if mode == "auto":
        return half_dtype(device) if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def configure_cuda(device, train):
    """The numerics of fp32 work on a GPU, set here and nowhere else (nothing changes on other devices).
    Training (train=True): cuDNN times the algorithms for each new shape once and keeps the
    fastest (cudnn.benchmark: a training run's shapes are fixed), and fp32 convolutions and
    matmuls may use TF32 on Ampere and later GPUs (10-bit mantissa inputs, fp32 sums), in the
    validation between epochs too. Prediction (train=False): no timing (one image at a
    time would pay it for every new batch size), and fp32 means fp32 (TF32 off), so that
    predict.py's probabilities match a CPU's within float noise; --amp is its fast path.
    The algorithm cuDNN picks can differ between processes, so on a GPU a resumed run equals the
    run that was not interrupted within float noise, not bit for bit as on a CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = train
    # the flags PyTorch reads everywhere (its newer fp32_precision settings may not be mixed with them)
    torch.backends.cudnn.allow_tf32 = train
    torch.set_float32_matmul_precision("high" if train else "highest")


def sum_dtype(device):
    """The dtype of running sums (losses, counts) kept on `device`: float64, except on Apple GPUs
    (MPS), which have no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def keep_freed_memory():
    """On a CPU, let the C allocator keep freed memory for the next step instead of handing it
    back to the system: every step frees and allocates the same activation-sized blocks, and
    glibc's default returns them, so each step pays the kernel again for fresh zeroed pages.
    Fixing the mmap threshold at its 32 MiB maximum and trimming only above 2 GiB made B0's
    training step 1.16x faster on a 2-core CPU (benchmark.py) for 4 % more resident memory.
    Linux with glibc only (True if applied); elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False


def default_workers(device=None, batch_size=None):
    """Data loader processes per training (or predicting) process, the CPUs shared out among the
    processes torchrun starts on this machine. Feeding a GPU: all of them but one, which the
    process itself needs to launch the GPU's work, and no more than a batch has images. On a CPU,
    where the model computes on the same cores as the loader: up to 8."""
    cpus = max(1, usable_cpus() // torchrun_local()[1])
    if device is not None and device.type == "cuda":
        return max(1, min(cpus - 1, batch_size or cpus))
    return min(cpus, 8)


def usable_cpus():
    """The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def usable_workers(requested):
    """--workers, but no more than the CPUs this process may use (more only slows loading down)."""
    cpus = usable_cpus()
    if requested > cpus:
        print0(f"note: --workers {requested} is more than the {cpus} CPUs here; using {cpus}", file=sys.stderr)
    return min(requested, cpus)


def init_loader_worker(worker_id=None):
    """The start of a data loader worker: SIGTERM (and SIGHUP) ends it at once and quietly, and it
    lets go of the run folder's lock it inherited (outputs.drop_inherited_locks). A signal sent to
    the whole process group (Slurm's scancel, kill -- -PGID, a closed terminal) reaches the workers
    too; killed by it, they made PyTorch print a traceback while the main process was saving and
    saying how to resume."""
    outputs.drop_inherited_locks()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: os._exit(0))


def stop_watching_workers():
    """In the main process, on the user's Ctrl-C or SIGTERM: a loader worker that dies of the same
    signal (one still starting when it reached the whole group, before init_loader_worker) is part
    of the stop. PyTorch's SIGCHLD handler would raise it as a worker error, with a traceback,
    while the stop is being reported; a handler that does nothing takes its place (not SIG_DFL: a
    SIGCHLD already pending would then be reported as "ignored due to race condition")."""
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)


# ---------------------------------------------------------------------------------------------
# Distributed processes (torchrun)
# ---------------------------------------------------------------------------------------------

def torchrun_local():
    """(local rank, processes on this machine) as torchrun sets them; (0, 1) in a plain process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def setup_distributed(device):
    """(rank, world size, local rank), initialising the process group when run under torchrun:
    NCCL between the GPUs of processes on `device` cuda (choose_device, called first, made it the
    current one), gloo between processes on the CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    if device.type == "mps":
        raise UsageError("torchrun with --device mps: processes cannot share an Apple GPU's tensors; "
                         "use --device cpu, or train in one process")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=30), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), local_rank


# the functions below are no-ops in a single process

def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def print0(*args, **kwargs):
    """print on the first process only (under torchrun also before the process group is up)."""
    if (rank() if is_distributed() else int(os.environ.get("RANK", 0))) == 0:
        print(*args, **kwargs)


def broadcast_buffers(model):
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def on_rank0(fn):
    """fn() run by rank 0 alone and its result given to every process, or its UsageError raised
    in every process; just fn() in a single process."""
    if not is_distributed():
        return fn()
    box = [None]
    if rank() == 0:
        try:
            box[0] = (fn(), None)
        except UsageError as e:
            box[0] = (None, e)
    dist.broadcast_object_list(box, 0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def all_reduce_sum(tensor):
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]: [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# RNG state, saved in last.pth
# ---------------------------------------------------------------------------------------------

def rng_state(device):
    """This process's RNG streams: the CPU's, Python's, and the GPU's it trains on (`device`)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """The streams of rng_state, the GPU's put on `device` (a run may resume on another GPU, or on
    a machine with fewer of them)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # saved before: one state per GPU visible, the process's at its index
        index = device.index or 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
