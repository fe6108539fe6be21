"""What benchmark.py's modes share: the table they all print, the median of rounds, commands
timed from launch to exit as a user starts them, the photos they read, and the memory of the
process that measures."""
import os
import subprocess
import sys
import time
from collections import namedtuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, whose scripts are timed
PEERS = os.path.dirname(os.path.abspath(__file__))  # the programs they are timed against


def peer(name):
    """The path of a peer program in this folder, to run as `python PATH`."""
    return os.path.join(PEERS, name)


def median(values):
    return sorted(values)[len(values) // 2]


class Table:
    """Every mode's rows in one format, the baseline first:

        name   the baseline's figure   this repo's figure   unit   ratio

    A mode compares in one direction, which the header names: "ratio" is this repo's figure over
    the baseline's (img/s: above 1 is faster; seconds, MiB: below 1 is less), "speed-up" is the
    baseline's seconds over this repo's (above 1 is faster). A figure that does not exist (a run
    that never got there, a command with no counterpart) is "-", and so is its ratio. Rows print
    as they are measured, since a mode can run for an hour."""

    WIDTH = 64

    def __init__(self, heading, speed_up=False):
        self.speed_up, self.rows = speed_up, []
        print(f"{heading:<{self.WIDTH}} {'baseline':>10} {'this repo':>10} {'unit':<6} "
              f"{'speed-up' if speed_up else 'ratio':>8}", flush=True)

    def row(self, name, base, ours, unit):
        """Prints a row and keeps it as (name, base, ours, unit, ratio or None)."""
        ratio = None if base is None or ours is None else base / ours if self.speed_up else ours / base
        self.rows.append((name, base, ours, unit, ratio))
        figure = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        print(f"{name:<{self.WIDTH}} {figure(base):>10} {figure(ours):>10} {unit:<6} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>8}", flush=True)


def sync(device):
    """Waits for the GPU's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss():
    """This process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_photos(folder, n, size):
    """n JPEGs of `size` cut from a real photo (matplotlib's sample of Grace Hopper), flipped and
    shifted so each decodes differently."""
    import matplotlib
    from PIL import Image, ImageOps
    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    paths = []
    for i in range(n):
        img = photo.rotate(i * 7, expand=False).resize(size)
        img = ImageOps.mirror(img) if i % 2 else img
        paths.append(os.path.join(folder, f"photo_{i:03d}.jpg"))
        img.save(paths[-1], quality=90)
    return paths


Ran = namedtuple("Ran", "seconds rss output")


def on_pty(command):
    """Ran(seconds from launch to exit, peak resident MiB of the process, what it printed) for
    `command` run with a pseudo-terminal as its stdout and stderr, as a user at a terminal starts it."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output, status, usage = b"", None, None
    while status is None:  # keep reading, so that the process never waits on a full terminal
        if select.select([master], [], [], 0.05)[0]:
            try:
                output += os.read(master, 65536)
            except OSError:
                pass
        pid, code, used = os.wait4(proc.pid, os.WNOHANG)
        if pid:  # its own usage and its reaped children's (data loader workers): the largest process
            status, usage = os.waitstatus_to_exitcode(code), used
    seconds = time.perf_counter() - start
    proc.returncode = status
    try:
        os.killpg(proc.pid, 9)  # data loader workers that outlived an os._exit
    except ProcessLookupError:
        pass
    os.close(master)
    if status != 0:
        sys.exit(f"benchmark: {' '.join(command[:4])} ... exited {status}:\n{output.decode(errors='replace')[-2000:]}")
    return Ran(seconds, usage.ru_maxrss / 1024, output.decode(errors="replace"))
