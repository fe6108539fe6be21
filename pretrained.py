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
not at all. Names are torchvision's: imagenet, IMAGENET1K_V1, DEFAULT,
EfficientNet_B<N>_Weights.IMAGENET1K_V1 and EfficientNet_V2_S_Weights.IMAGENET1K_V1 (M, L); all of
them mean the V1 file (see NAMES_HELP).
"""
import base64
import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import torch
from tqdm import tqdm

from errors import WeightsError
from cli import progress_bars
from model import title
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
    "v2_s": "efficientnet_v2_s-dd5fe13b.pth",
    "v2_m": "efficientnet_v2_m-dc08266a.pth",
    "v2_l": "efficientnet_v2_l-59c71312.pth",
}
# their sizes in MB, as torchvision's weights record them (meta["_file_size"]): a server that sends
# more than a little over this is not sending the file
MEGABYTES = {"b0": 20.451, "b1": 30.134, "b2": 35.174, "b3": 47.184, "b4": 74.489, "b5": 116.864, "b6": 165.362,
             "b7": 254.675, "v2_s": 82.704, "v2_m": 208.01, "v2_l": 454.573}
BASE_URL = "https://download.pytorch.org/models"
URL_ENV = "EFFICIENTNET_WEIGHTS_URL"  # a mirror (or a local web server) that holds the same file names
TIMEOUT = 30  # seconds without a byte from the server before a download counts as failed
TIME_LIMIT = 7200  # seconds for a whole download (B7 at 0.1 MB/s takes 42 minutes)
LOG_INTERVAL = 5.0  # seconds between progress lines when stderr is a log file, not a terminal
NAMES = ("imagenet, IMAGENET1K_V1, DEFAULT, EfficientNet_B<N>_Weights.IMAGENET1K_V1, "
         "EfficientNet_V2_<S|M|L>_Weights.IMAGENET1K_V1 (or .DEFAULT)")
NAMES_HELP = (f"{NAMES}: torchvision's ImageNet weights for --model, from torch's cache or downloaded. "
              "All mean IMAGENET1K_V1, also DEFAULT for b1 (torchvision's DEFAULT there is V2, which "
              "needs another eval transform)")

_NAME = re.compile(r"(?:efficientnet_(b[0-7]|v2_[sml])_weights\.)?(imagenet1k_v[12]|default)|imagenet")


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
        raise WeightsError(f"--weights {weights} are {title(variant)} weights but --model is {model}: "
                           f"use --model {variant}, or --weights imagenet for {model}'s")
    variant = variant or model or "b0"
    name = FILES[variant]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)

    def fetch_reporting_errors():  # an error travels to every rank as text, and each rank raises it
        try:
            return fetch(name, path, MEGABYTES[variant]), None
        except WeightsError as e:
            return None, str(e)

    _, error = (on_rank0 or (lambda fn: fn()))(fetch_reporting_errors)
    if error:
        raise WeightsError(error)
    # rank 0's file, already here; on another machine of a multi-node run, this rank's own download
    return fetch(name, path, MEGABYTES[variant])


def url_for(name):
    base = os.environ.get(URL_ENV) or BASE_URL
    return f"{base.rstrip('/')}/{name}"


def without_credentials(url):
    """(the URL without user:password@, the Basic auth header they make or None, the URL as it may
    be printed: http://***@host/...). ValueError for a URL that cannot be read (a broken IPv6 host)."""
    parts = urllib.parse.urlsplit(url)
    parts.port  # noqa: B018 -- reading it checks the port, as urlopen would later
    if "@" not in parts.netloc:
        return url, None, url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)), f"Basic {token}",
            urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}")))


def shown(text):
    """`text` (a URL, a message) with any user:password@ of a URL in it replaced by ***@."""
    return re.sub(r"(?<=://)[^/@\s]*@", "***@", text)


TEMP_SUFFIX = ".download"  # an unfinished download in torch's cache: .NAME.HOST.PID.XXXX.download


def remove_stale_downloads(folder):
    """Unfinished downloads of processes on this machine that have ended (killed mid-way: kill -9,
    the out-of-memory killer) are removed; those of running processes, or of other machines that
    share the folder, stay."""
    host = socket.gethostname()
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"\..+\.(.+)\.(\d+)\.[^.]+" + re.escape(TEMP_SUFFIX), entry)
        if m and m.group(1) == host and not alive(int(m.group(2))):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def damage(path):
    """Why the cached file at `path` is not whole, or None. Every entry of the zip archive torch.save
    writes is stored uncompressed with its CRC-32, so checking them all reads the file once (a few
    ms for B0, about 0.1 s for B7) and finds a file cut short or changed on disk."""
    if not zipfile.is_zipfile(path):
        return "truncated or empty"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            packed = next((e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED), None)
            if packed:
                return f"its entry {packed} is compressed, which torch.save never does"
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        return f"not a whole zip archive: {e}"
    return f"its entry {bad} fails its CRC check" if bad else None


def fetch(name, path, megabytes):
    """`path` if it exists and is whole (as torch.hub, it is not hashed again), else downloaded from url_for(name)
    to a temporary file beside it, checked, and renamed into place: a failed or interrupted
    download leaves nothing, and two processes downloading at once each rename a whole file. The
    server may send at most a little more than the file's `megabytes`, within TIME_LIMIT seconds."""
    if os.path.isfile(path):
        why = damage(path)
        if why:
            raise WeightsError(f"the cached file {path} is damaged ({why}); delete it, and the next run downloads "
                               "it again")
        return path
    by_hand = f"copy the file by hand to {path}, or pass the file with --weights PATH"
    mirror = f" ({URL_ENV}={shown(os.environ[URL_ENV])})" if os.environ.get(URL_ENV) else ""
    try:
        url, auth, printed = without_credentials(url_for(name))
    except ValueError as e:
        raise WeightsError(f"cannot download {shown(url_for(name))}{mirror} (not a URL: {e}); {by_hand}") from None
    expected = re.fullmatch(r".*-([0-9a-f]{8,})\.[a-z]+", name).group(1)
    limit = int(megabytes * 1e6 * 1.02) + (1 << 20)

    def download(f):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})  # as torch.hub asks
            if auth:
                request.add_unredirected_header("Authorization", auth)  # never sent on to another host
            response = urllib.request.urlopen(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            raise WeightsError(f"cannot download {printed}{mirror}: HTTP {e.code} {shown(str(e.reason))}; "
                               f"{by_hand}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(f"cannot download {printed}{mirror} ({shown(str(reason))}); {by_hand}") from None
        with response:
            length = response.headers.get("Content-Length")
            if length is not None and not length.strip().isdigit():
                raise WeightsError(f"cannot download {printed}{mirror} (the server's Content-Length "
                                   f"{length[:20]!r} is not a number); {by_hand}")
            total = int(length or 0) or None
            if total is not None and total > limit:
                raise WeightsError(f"cannot download {printed}{mirror} (the server would send {total / 1e6:.1f} MB "
                                   f"for a file of {megabytes:.1f} MB); check the mirror, or {by_hand}")
            digest, got = hashlib.sha256(), 0
            with Progress(printed, path, total) as progress:
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
                    if got > limit or progress.elapsed() > TIME_LIMIT:
                        why = (f"sent more than {limit / 1e6:.1f} MB for a file of {megabytes:.1f} MB" if got > limit
                               else f"took more than {TIME_LIMIT} s")
                        raise WeightsError(f"the download of {printed}{mirror} {why}; nothing was kept: check the "
                                           f"mirror, or {by_hand}")
        if block is None or (total is not None and got != total):
            raise WeightsError(f"the download of {printed} broke off after {got:,} of "
                               f"{f'{total:,}' if total else 'an unknown number of'} bytes; nothing was kept: "
                               f"run again, or {by_hand}")
        if not digest.hexdigest().startswith(expected):
            raise WeightsError(f"{printed}{mirror} sent a file whose sha256 starts {digest.hexdigest()[:len(expected)]}, "
                               f"not {expected} as its name says; nothing was kept: check the mirror, or {by_hand}")
        done.update(size=got, seconds=progress.elapsed())

    done = {}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_stale_downloads(os.path.dirname(path))
        atomic_write(path, download, prefix=f".{name}.{socket.gethostname()}.{os.getpid()}.", suffix=TEMP_SUFFIX)
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
