"""DVC stage entry points: `python -m pipeline.stages.<name>`, each a thin main()."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from idm.io import ImageReadError
from pipeline.params import ParamsError

# Errors caused by input or configuration: reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ParamsError, ImageReadError, ValueError, FileNotFoundError)


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); a user error becomes a one-line message and exit code 2."""
    from idm.fetch import FetchError  # imported here: only the download stage needs it loaded

    try:
        main()
    except (*USER_ERRORS, FetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `out`; it replaces `out` only if the block succeeds."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
