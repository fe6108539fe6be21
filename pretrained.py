"""ImageNet weights by name: `--weights imagenet` is torchvision's official file for the --model
variant, taken from torch's hub cache or downloaded there once.

    python train.py --data-path data/flower_photos --model b0 --weights imagenet
    python predict.py photo.jpg --weights imagenet --model b3 --topk 5
    python export.py --weights EfficientNet_B2_Weights.IMAGENET1K_V1 --format pt2
    EFFICIENTNET_WEIGHTS_URL=http://mirror.example/models python train.py --weights imagenet   # a mirror

    import pretrained
    path = pretrained.resolve("imagenet", "b0")  # ~/.cache/torch/hub/checkpoints/efficientnet_b0_rwightman-7f5810bc.pth

The cache is torchvision's own ($TORCH_HOME/hub/checkpoints, as torch.hub.get_dir() finds it), so
a file torchvision downloaded is used as it is, and the other way round. A download is checked
against the sha256 prefix in its file name (as torch.hub's check_hash does) and lands whole or
not at all. Names are torchvision's: imagenet, IMAGENET1K_V1, DEFAULT and
EfficientNet_B<N>_Weights.IMAGENET1K_V1; all of them mean the V1 file (see NAMES_HELP).
"""
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request

import torch
from tqdm import tqdm

from checkpoint import WeightsError
from cli import progress_bars
from outputs import atomic_write

# torchvision's IMAGENET1K_V1 file of each variant; the hash after the last '-' is the start of its sha256
FILES = {
    "b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "b1": "efficientnet_b1_rwightman-bac287d4.pth",
    "b2": "efficientnet_b2_rwightman-c35c1473.pth",
    "b3": "efficientnet_b3_rwightman-b3899882.pth",
    "b4": "efficientnet_b4_rwightman-23ab8bcd.pth",
    "b5": "efficientnet_b5_lukemelas-1a07897c.pth",
    "b6": "efficientnet_b6_lukemelas-24a108a5.pth",
    "b7": "efficientnet_b7_lukemelas-c5b4e57e.pth",
}
BASE_URL = "https://download.pytorch.org/models"
URL_ENV = "EFFICIENTNET_WEIGHTS_URL"  # a mirror (or a local web server) that holds the same file names
TIMEOUT = 30  # seconds without a byte from the server before a download counts as failed
LOG_INTERVAL = 5.0  # seconds between progress lines when stderr is a log file, not a terminal
NAMES = "imagenet, IMAGENET1K_V1, DEFAULT, EfficientNet_B<N>_Weights.IMAGENET1K_V1 (or .DEFAULT)"
NAMES_HELP = (f"{NAMES}: torchvision's ImageNet weights for --model, from torch's cache or downloaded. "
              "All mean IMAGENET1K_V1, also DEFAULT for b1 (torchvision's DEFAULT there is V2, which "
              "needs another eval transform)")

_NAME = re.compile(r"(?:efficientnet_(b[0-7])_weights\.)?(imagenet1k_v[12]|default)|imagenet")


def variant_of(weights):
    """For a --weights that is one of NAMES (in any case): the variant it names, or "" for a bare
    name; None for anything else. A name wins over a file of that name (./imagenet is the file)."""
    m = _NAME.fullmatch(str(weights).lower())
    if m is None:
        return None
    if m.group(2) == "imagenet1k_v2":
        raise WeightsError(f"--weights {weights}: IMAGENET1K_V2 (B1 only) is evaluated with torchvision's resize "
                           "255 / bilinear, which these scripts do not use; use --weights imagenet (V1), or pass "
                           "the V2 file with --weights PATH to fine-tune from it")
    return m.group(1) or ""


def resolve(weights, model=None, on_rank0=None):
    """The file to load for --weights: `weights` itself when it is a path (or None), or, for one of
    NAMES, torchvision's file for the variant in torch's hub cache, downloaded first when missing.
    `model` is --model (None: not given, then the name's variant, else b0). `on_rank0` is
    utils.on_rank0 under torchrun: rank 0 downloads while the others wait. WeightsError (one line)
    when the name is unknown, the variants disagree or the file cannot be had."""
    if weights is None:
        return None
    variant = variant_of(weights)
    if variant is None:
        if not os.path.exists(weights):
            official = next((v for v, f in FILES.items() if f == os.path.basename(weights)), None)
            if official:  # the README's table of manual downloads, not downloaded yet
                raise WeightsError(f"weights file not found: {weights}; it is torchvision's ImageNet file for "
                                   f"{official}: --weights imagenet --model {official} downloads it (or see README)")
            raise WeightsError(f"weights file not found: {weights}; check the --weights path, or give one of the "
                               f"names of ImageNet weights: {NAMES}")
        return weights
    if variant and model and variant != model:
        raise WeightsError(f"--weights {weights} are EfficientNet-{variant.upper()} weights but --model is {model}: "
                           f"use --model {variant}, or --weights imagenet for {model}'s")
    name = FILES[variant or model or "b0"]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)

    def fetch_reporting_errors():  # an error travels to every rank as text, and each rank raises it
        try:
            return fetch(name, path), None
        except WeightsError as e:
            return None, str(e)

    _, error = (on_rank0 or (lambda fn: fn()))(fetch_reporting_errors)
    if error:
        raise WeightsError(error)
    # rank 0's file, already here; on another machine of a multi-node run, this rank's own download
    return fetch(name, path)


def url_for(name):
    base = os.environ.get(URL_ENV) or BASE_URL
    return f"{base.rstrip('/')}/{name}"


def fetch(name, path):
    """`path` if it exists (as torch.hub, it is not hashed again), else downloaded from url_for(name)
    to a temporary file beside it, checked, and renamed into place: a failed or interrupted
    download leaves nothing, and two processes downloading at once each rename a whole file."""
    if os.path.isfile(path):
        return path
    url = url_for(name)
    expected = re.fullmatch(r".*-([0-9a-f]{8,})\.[a-z]+", name).group(1)
    by_hand = f"copy the file by hand to {path}, or pass the file with --weights PATH"
    mirror = f" ({URL_ENV}={os.environ[URL_ENV]})" if os.environ.get(URL_ENV) else ""

    def download(f):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})  # as torch.hub asks
            response = urllib.request.urlopen(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            raise WeightsError(f"cannot download {url}{mirror}: HTTP {e.code} {e.reason}; {by_hand}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(f"cannot download {url}{mirror} ({reason}); {by_hand}") from None
        with response:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest, got = hashlib.sha256(), 0
            with Progress(url, path, total) as progress:
                while True:
                    try:
                        block = response.read(1 << 16)
                    except (OSError, http.client.HTTPException):  # a reset or a stall of TIMEOUT seconds
                        block = None
                    if not block:
                        break
                    f.write(block)
                    digest.update(block)
                    got += len(block)
                    progress.update(len(block))
        if block is None or (total is not None and got != total):
            raise WeightsError(f"the download of {url} broke off after {got:,} of "
                               f"{f'{total:,}' if total else 'an unknown number of'} bytes; nothing was kept: "
                               f"run again, or {by_hand}")
        if not digest.hexdigest().startswith(expected):
            raise WeightsError(f"{url}{mirror} sent a file whose sha256 starts {digest.hexdigest()[:len(expected)]}, "
                               f"not {expected} as its name says; nothing was kept: check the mirror, or {by_hand}")
        done.update(size=got, seconds=progress.elapsed())

    done = {}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, download)
    except OSError as e:  # the cache folder: read-only, a full disk
        raise WeightsError(f"cannot write {path} ({e.strerror}): free some space, or set TORCH_HOME to a "
                           "writable folder") from None
    print(f"downloaded {name} ({done['size'] / 1e6:.1f} MB in {done['seconds']:.0f}s, sha256 checked)",
          file=sys.stderr, flush=True)
    return path


class Progress:
    """A tqdm bar on a terminal; in a log file a line every LOG_INTERVAL seconds."""

    def __init__(self, url, path, total):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.next_line = self.start + LOG_INTERVAL
        size = f" ({total / 1e6:.1f} MB)" if total else ""
        print(f"downloading {url} to {path}{size}", file=sys.stderr, flush=True)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path), leave=False,
                        dynamic_ncols=True, disable=not progress_bars())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def elapsed(self):
        return time.monotonic() - self.start

    def update(self, n):
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.bar.disable and now >= self.next_line:
            self.next_line = now + LOG_INTERVAL
            rate = self.done / (now - self.start)
            of = f" of {self.total / 1e6:.1f} MB ({100 * self.done / self.total:.0f}%)" if self.total else " MB"
            left = f", {(self.total - self.done) / rate:.0f}s left" if self.total and rate else ""
            print(f"  {self.done / 1e6:.1f}{of}, {rate / 1e6:.1f} MB/s{left}", file=sys.stderr, flush=True)
