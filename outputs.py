"""How the scripts write files: whole or not at all (a temporary file renamed over the target),
and checked before any work is done.

    from outputs import atomic_write
    atomic_write("weights/run/metrics.csv", lambda f: f.write(b"epoch,..."))
"""
import os
import tempfile

from cli import UsageError


def atomic_write(path, write):
    """Write through a temporary file in the same folder, fsync, then rename over `path`: a crash
    at any moment leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0o022)  # read it (there is no other way) and put it back at once
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as open() would create it: mkstemp makes files only the owner reads
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path, text):
    """UTF-8; file names that are not UTF-8 keep their bytes as on disk (surrogateescape)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def remove_stale_temp_files(folder):
    """Temporary files that a killed process left behind mid-write (the real files are intact)."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def check_output_file(path, flag):
    """Fail before predicting anything when --csv or --plot cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: give a file name, e.g. {os.path.join(path, 'out')}")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist; create it or choose another")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable; choose another")
