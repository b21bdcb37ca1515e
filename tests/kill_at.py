"""Run `pdt` and SIGKILL it at a chosen point, so kill tests hit each stage on purpose.

    python kill_at.py MODULE:ATTR N before|after -- PDT ARGS...

The N-th call of MODULE.ATTR kills the process just before or just after the call runs.
A real SIGKILL, in a real process, at a point chosen by the test and not by a timer.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def main() -> None:
    target, nth, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    args = sys.argv[sys.argv.index("--") + 1:]
    module_name, attr = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    def wrapper(*a, **k):
        nonlocal calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*a, **k)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)
    from pdtcli.cli import run

    sys.argv = ["pdt", *args]
    run()


if __name__ == "__main__":
    main()
