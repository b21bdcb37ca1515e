"""`pdt` and `python -m pdtcli`: start the CLI, and keep Ctrl-C during start-up to one line.

Importing torch takes seconds, so an interrupt often lands before the CLI's own handler is
in place; this module imports nothing heavy itself and catches it around the import.
"""

from __future__ import annotations

import sys

INTERRUPTED_EXIT = 130


def main() -> None:
    try:
        from .cli import run
    except KeyboardInterrupt:
        print("pdt: interrupted while starting; nothing was read or written", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    run()


if __name__ == "__main__":
    main()
