"""Ctrl-C, SIGTERM and SIGHUP (a closed terminal) as a stop the user asked for, from a script's
first line to its last.

    import stop_signals  # a script's first import: a signal while torch loads ends it quietly
    ...
    stop_signals.interrupt_on_signals(runtime.stop_watching_workers)  # from here on: KeyboardInterrupt

Imported by a script of this folder that is being run, this module (which loads nothing heavy)
makes the three signals end the process at once with exit code 130 and no traceback: torch and
numpy take seconds to import, and nothing has been written yet. Imported by anything else (a
test, another program), it changes nothing until interrupt_on_signals is called.
"""
import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SIGNALLED = []  # the signals received so far


def stop_while_loading(signum, frame):
    SIGNALLED.append(signum)
    sys.exit(130)


def interrupt_on_signals(first=None):
    """From now on each of SIGNALS raises KeyboardInterrupt in the main thread, as Ctrl-C does, so
    that one `except KeyboardInterrupt` says how to go on; `first()` runs before it is raised."""
    def interrupt(signum, frame):
        SIGNALLED.append(signum)
        if first is not None:
            first()
        raise KeyboardInterrupt
    for sig in SIGNALS:
        signal.signal(sig, interrupt)


def _run_as_script():
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return bool(main) and os.path.dirname(os.path.abspath(main)) == os.path.dirname(os.path.abspath(__file__))


if _run_as_script():
    for _sig in SIGNALS:
        signal.signal(_sig, stop_while_loading)
