"""The console script's entry: the CLI run in a worker thread, so that SIGINT and SIGTERM
are answered at once at any stage, imports included.

The main thread installs the signal handlers before anything heavy is imported, then waits
for the worker. On a signal it removes every staging directory being written (see
:func:`hetmap.compiler.backends.plan.discard_staging`), prints ``error: interrupted`` and exits
130 (SIGINT) or 143 (SIGTERM); C++ code that does not return to Python for seconds (the ONNX
export, a large matrix product) cannot delay it. Finished outputs are never touched: they
were renamed into place atomically, and a first signal after that (while the summary prints)
is ignored, so the exit status is the work's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised in the main thread by the signal handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def output_committed() -> bool:
    """Whether the command's output has been renamed into place. A signal may arrive while
    ``hetmap.compiler.backends.plan`` is still importing (in ``sys.modules``, no
    ``COMMITTED`` yet): nothing is committed then."""
    return bool(getattr(sys.modules.get("hetmap.compiler.backends.plan"), "COMMITTED", False))


def run_interruptible(argv: list[str]) -> int:
    """:func:`main` in a worker thread, so that the main thread answers SIGINT and SIGTERM at
    once at any stage (C++ code such as the ONNX export or a matrix product does not return
    to Python for seconds): it removes every staging directory being written, prints
    ``error: interrupted`` and exits 130 (SIGINT) or 143 (SIGTERM). Finished outputs are
    never touched: they were renamed into place atomically."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            from hetmap.compiler.cli import main

            outcome["code"] = main(argv)
        except BaseException as exc:  # re-raised in the main thread
            outcome["error"] = exc

    def on_signal(signum: int, _frame: Any) -> None:
        if output_committed() and not outcome.get("late_signal"):
            # the output is whole and in place, only the summary is left to print: finish it
            # (a second signal still stops at once)
            outcome["late_signal"] = True
            return
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=work, name="hetmap-main", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    except _Interrupted as exc:
        for s in previous:  # a second signal while cleaning up must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        if "code" in outcome or "error" in outcome:  # the work had already ended: report that
            return _finish(outcome)
        # modules not imported yet, or still importing, have staged nothing
        discard = getattr(sys.modules.get("hetmap.compiler.backends.plan"), "discard_staging",
                          None)
        if discard is not None:
            discard()
        kept_on = getattr(sys.modules.get("hetmap.compiler.evaluation.sweep"),
                          "kept_on_interrupt", None)
        kept = kept_on() if kept_on is not None else []
        sys.stderr.write("".join(f"\n{line}" for line in kept) + "\nerror: interrupted\n")
        sys.stderr.flush()
        os._exit(130 if exc.signum == signal.SIGINT else 143)
    for s in previous:  # the work is done and its output in place: a late signal changes nothing
        signal.signal(s, signal.SIG_IGN)
    return _finish(outcome)


def _finish(outcome: dict[str, Any]) -> int:
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome.get("code", 1))


def run() -> None:
    """``hetmap`` console script."""
    sys.exit(run_interruptible(sys.argv[1:]))
