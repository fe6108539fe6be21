"""How the scripts write files: whole or not at all (a temporary file renamed over the target),
and checked before any work is done.

    from outputs import atomic_write
    atomic_write("weights/run/metrics.csv", lambda f: f.write(b"epoch,..."))
"""
import contextlib
import fcntl
import os
import stat
import tempfile

from errors import UsageError, WriteError


def atomic_write(path, write, prefix=".", suffix=".tmp"):
    """Write through a temporary file in the same folder, fsync, then rename over `path`: a crash
    at any moment leaves either the old file or the new one, never half of one. A link is written
    through (the file it names is replaced, the link stays), and what is not a regular file (a
    FIFO, /dev/stdout, a shell's >(...)) is written to directly: renaming over it would replace
    the pipe or the device instead of feeding it. OSError as the disk or the device reports it."""
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    if special:
        with open(path, "wb") as f:
            write(f)
        return
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    # a short name of its own: the target's name plus a suffix can pass the 255 bytes a name may have
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
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



@contextlib.contextmanager
def reported_as(flag, path):
    """An OSError while the block writes `path` as a WriteError of one line that names it."""
    try:
        yield
    except BrokenPipeError:  # stdout's reader (`| head`) or the file's stopped reading: the script's to say
        raise
    except OSError as e:
        raise WriteError(f"cannot write {flag} {e.filename or path}: {e.strerror or e}") from None


def check_distinct(outputs, inputs):
    """Fail before any work when an output would overwrite an input or another output. `outputs`
    and `inputs` are (what, path) pairs, e.g. ("--csv", "p.csv"), ("the --weights file", "best.pth");
    a file is the same under any of its names (links, "..", another spelling of the folder)."""
    def keys(path):
        found = {("path", os.path.realpath(path))}
        try:
            st = os.stat(path)
            found.add(("file", st.st_dev, st.st_ino))
        except OSError:  # not there yet
            pass
        return found

    seen = {}
    for what, path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        seen.setdefault(("file", st.st_dev, st.st_ino), what)
    for flag, path in outputs:
        for key in keys(path):
            if key in seen:
                raise UsageError(f"{flag} {path} is also {seen[key]}: writing it would overwrite that; "
                                 "choose another file")
        seen.update((key, f"the {flag} file") for key in keys(path))


def check_output_file(path, flag):
    """Fail before predicting anything when --csv or --plot cannot be written."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):  # a FIFO, /dev/stdout
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} is not writable; choose another file")
        return
    folder = os.path.dirname(os.path.realpath(path))  # a link is written through to the file it names
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: give a file name, e.g. {os.path.join(path, 'out')}")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist; create it or choose another")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable; choose another")


def new_folder(base):
    """`base`, or base-2, base-3, ... where that exists: the first free name, made at once, so that two
    processes starting together never get the same folder and nothing there before is reused."""
    for n in range(1, 1_000_000):
        folder = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}-1000000")


# ---------------------------------------------------------------------------------------------
# Run folders locked while a command writes them
# ---------------------------------------------------------------------------------------------

LOCKED = []  # the descriptors that hold this command's run folders locked


def lock_folder(folder):
    """Hold an exclusive lock on a run folder until the command ends (the kernel drops it when the
    process ends, however it ends), so two processes never write one run. The lock is on the
    folder itself, so no lock file is left in a finished run. Loader workers, forked with a copy
    of the descriptor, close theirs at start (drop_inherited_locks): after a kill -9 of train.py
    they lived on for seconds and kept its run locked against the resume."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = lock_holder(folder)
        who = f"another train.py (process {pid}) is" if pid else "another train.py is"
        stop = f"stop it: kill {pid}" if pid else "or stop it"
        raise UsageError(f"{who} writing to {folder} right now; wait for it to end ({stop}), or choose another "
                         "--output-dir") from None
    LOCKED.append(fd)  # open until the command ends: closing it releases the lock


def release_folders():
    """The end of a command: its run folders are free (another command in this process may follow).
    In a process forked from one that holds run folders (a loader worker, drop_inherited_locks) it
    closes the copies of the descriptors only: the lock is the parent's, and ends with it alone."""
    while LOCKED:
        with contextlib.suppress(OSError):
            os.close(LOCKED.pop())


drop_inherited_locks = release_folders


def lock_holder(folder):
    """The pid that locked `folder` (flock), from Linux's /proc/locks; None where it cannot be told."""
    try:
        st = os.stat(folder)
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()  # 1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None
