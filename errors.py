"""The errors a user's own input or machine can cause. Each script catches them at its top and
prints the message as one line (never a traceback) with a non-zero exit: the message names the
file or flag and says what to change.

    UsageError          a flag or path that cannot be used (a run folder, a device)
      DataError         the data folder as given
    WeightsError        a weights or checkpoint file (missing, damaged, not what it claims)
    WriteError          an output that could not be written after all
    NonFiniteLossError  the loss or the weights became NaN or infinite: the run diverged
"""


class UsageError(ValueError):
    """A flag or path the user gave cannot be used (a run folder, a device); the message says what to change."""


class DataError(UsageError):
    """The data folder cannot be used as given; the message says what to change."""


class WeightsError(ValueError):
    """A weights or checkpoint file cannot be used; the message names the file and says why."""


class WriteError(Exception):
    """An output could not be written after all (a full disk, a folder made read-only since it was
    checked); the message names it."""


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite: the run diverged."""
