"""What every script's command line shares: the flag parser (no abbreviations, a close flag
suggested for a typo), the errors that end a script with one line instead of a traceback, and how
warnings and file or class names are printed."""
import argparse
import difflib
import errno
import os
import re
import sys
import warnings

from PIL import Image


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" where there is a default to show and the help text does not
    already say it."""

    def __init__(self, prog, **kwargs):
        super().__init__(prog, max_help_position=30, **kwargs)

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False \
                or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


# flags of the tutorial's scripts that these scripts answer otherwise
TUTORIAL_FLAGS = {"--num-classes": "the class count comes from the class folders under --data-path; no flag needed"}
# what other training scripts call a flag that has another name here
OTHER_NAMES = {"--early-stopping": "--patience", "--early-stop": "--patience", "--es-patience": "--patience",
               "--pretrained": "--weights", "--learning-rate": "--lr", "--wd": "--weight-decay",
               "--num-workers": "--workers", "--log-dir": "--tensorboard", "--logdir": "--tensorboard"}


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: no abbreviations (--epoch is a typo, not --epochs), and a close flag
    name suggested for a flag it does not know (--img_size: did you mean --img-size?)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = [flag for action in self._actions for flag in action.option_strings]
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    typed = word.split("=")[0].replace("_", "-").lower()
                    close = difflib.get_close_matches(typed, flags, n=1, cutoff=0.7)
                    if typed in TUTORIAL_FLAGS:
                        message += f" ({word.split('=')[0]}: {TUTORIAL_FLAGS[typed]})"
                    elif OTHER_NAMES.get(typed) in flags:
                        message += f" (did you mean {OTHER_NAMES[typed]}?)"
                    elif close:
                        message += f" (did you mean {close[0]}?)"
        super().error(message)




def quiet_warnings():
    """Warnings as this repo's one-line messages, never with a line of library code under them.
    Pillow's decompression-bomb warning becomes an error, so the image is named and left out like
    any unreadable one; Pillow's notes on conversions that load_rgb makes anyway, and PyTorch's on
    a scheduler step that a skipped fp16 step causes, are dropped. Called by the scripts at start."""
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    for message in ("Palette images with Transparency", "(Possibly )?[Cc]orrupt EXIF", "Truncated File Read",
                    "Image appears to be a malformed MPO", "Metadata Warning",
                    r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                    "This DataLoader will create",  # --workers is capped at the CPU count instead
                    "Validating sparse tensor invariants"):  # a sparse tensor in a weights file is refused anyway
        warnings.filterwarnings("ignore", message=message)
    warnings.showwarning = lambda message, category, *rest: print(f"warning: {printable(str(message))}",
                                                                   file=sys.stderr)


def speak_any_file_name():
    """Let print() show any file name: one that is not UTF-8 is printed with backslash escapes
    instead of raising UnicodeEncodeError. Called by the scripts at start."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: a terminal acts on them instead of showing them


def printable(name):
    """A file or class name as text a terminal or a plot shows as it is: bytes that are not UTF-8 as
    \\xNN escapes, and control characters (an escape sequence that clears the screen, a newline
    that starts a fake result line) as \\x1b, \\n, \\r."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def progress_bars():
    """True where a progress bar can be drawn: stderr is a terminal that reports a width. Some
    terminals report 0 columns (`script` without a tty, some containers); tqdm then draws empty
    bars and nothing readable appears for minutes, so they get the plain log lines instead."""
    if not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except OSError:
        return False


class UnreadStream:
    """sys.stdout or sys.stderr, turned into /dev/null once nobody reads it (`train.py | head`, a
    closed terminal): the run goes on, its checkpoints and metrics.csv written as before. A pipe
    closed is not a full disk, and not a reason to stop training."""

    def __init__(self, stream, other=None):
        self.stream, self.other = stream, other

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            self.gone(e)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            self.gone(e)

    def gone(self, e):
        if e.errno not in (errno.EPIPE, errno.EIO):  # EIO: the terminal was closed
            raise e
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())  # what is still buffered goes there too
        os.close(null)
        if self.other is not None:
            print("note: nothing reads the standard output any more (a closed pipe or terminal); training goes "
                  "on without its lines (metrics.csv in the run folder has them)", file=self.other)

    def __getattr__(self, name):
        return getattr(self.stream, name)
