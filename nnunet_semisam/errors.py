"""One error type for everything a user can get wrong, and how it reaches the user as one line.

`nnunet-semisam` prints a `SemiSAMError` as one line (`error: ...`) and exits with status 2; library callers catch
it like any exception. Messages name the offending file or value and, where there is one, the fix.

`nnUNetv2_train` is nnU-Net's command, not ours, so it cannot catch our errors: `install_one_line_errors` (called by
every trainer of this plugin) installs a `sys.excepthook` that prints an uncaught `SemiSAMError` as the last line of
stderr, `error: <message>`, without a traceback (the process exits with status 1, as for any uncaught exception).
Every other exception goes to the previous hook unchanged. `nnUNet_semisam_traceback=1` in the environment restores
the full traceback of a `SemiSAMError` too (for debugging the plugin).
"""
from __future__ import annotations

import os
import sys
import weakref
from typing import Callable

TRACEBACK_ENV = "nnUNet_semisam_traceback"  # "1": uncaught SemiSAMErrors print their full traceback


class SemiSAMError(Exception):
    """A user-facing error: bad input, missing configuration, inconsistent data. Message is one actionable line."""


def one_line(error: BaseException) -> str:
    """`error: <message>` on one line (line breaks of the message become spaces)."""
    return "error: " + " ".join(str(error).split("\n")).strip()


_cleanup: list[Callable[[], Callable[[], None] | None]] = []  # weak reference to the latest trainer's cleanup


def install_one_line_errors(cleanup: Callable[[], None] | None = None) -> None:
    """Make an uncaught `SemiSAMError` end the process with the single stderr line `error: <message>`.

    cleanup: a bound method called (quietly, errors ignored) before the line is printed, e.g. a trainer stopping its
    data-augmentation workers so that their shutdown messages do not follow the error line. Only a weak reference
    is kept, and only to the latest one. Installing twice keeps one hook. Exceptions other than `SemiSAMError` go to
    the hook that was installed before, untouched; with `$nnUNet_semisam_traceback=1` a `SemiSAMError` does too
    (after the cleanup), so its full traceback is printed.
    """
    if cleanup is not None:
        ref = weakref.WeakMethod(cleanup) if hasattr(cleanup, "__self__") else (lambda c=cleanup: c)
        _cleanup[:] = [ref]
    if getattr(sys.excepthook, "_semisam_one_line", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if not (isinstance(exc_type, type) and issubclass(exc_type, SemiSAMError)):
            return previous(exc_type, exc, tb)
        for ref in list(_cleanup):
            fn = ref()
            if fn is not None:
                try:
                    fn()
                except BaseException:  # noqa: BLE001 - the error line matters more than a failed cleanup
                    pass
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        if os.environ.get(TRACEBACK_ENV) == "1":
            return previous(exc_type, exc, tb)
        sys.stderr.write(one_line(exc) + "\n")
        sys.stderr.flush()

    hook._semisam_one_line = True
    sys.excepthook = hook
