"""The `idm` command's entry point: Ctrl-C or SIGTERM at any moment ends in one line, exit 130.

Importing the CLI takes seconds (torch); an interrupt then would print Python's import
traceback. This module imports only the standard library and answers both signals itself
(nothing has been written yet, so there is nothing to clean up) until `pipeline.cli.main`
installs the handlers that unwind its work.
"""

from __future__ import annotations

import os
import signal


def _interrupted(signum: int, frame: object) -> None:
    os.write(2, b"idm: interrupted before any work started; nothing was written\n")
    os._exit(130)


def main(argv: list[str] | None = None) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # a background job ignores Ctrl-C: keep that
            signal.signal(signum, _interrupted)
    from pipeline.cli import main as run

    run(argv)


if __name__ == "__main__":
    main()
