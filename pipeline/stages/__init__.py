"""DVC stage entry points: `python -m pipeline.stages.<name>`, each a thin main()."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from idm.fetch import FetchError
from idm.io import ImageReadError
from pipeline.params import ParamsError
from pipeline.tracking import TrackingUnavailable, display_uri, tracking_uri

# Errors caused by input or configuration: reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ParamsError, ImageReadError, ValueError, FileNotFoundError)

# What to do about the machine's own failures (OSError) of these kinds.
_OS_ADVICE = {
    errno.ENOSPC: "free some disk space and rerun",
    errno.EDQUOT: "free some space within the disk quota and rerun",
    errno.EFBIG: "the file system refuses a file this large; write the outputs elsewhere",
    errno.EROFS: "the file system is read-only; write the outputs elsewhere",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
}


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); every expected failure becomes one line `error: ...` and exit code 2.

    Expected failures: bad input or configuration (USER_ERRORS, FetchError), the MLflow
    store being unavailable or failing (pipeline.tracking.TrackingUnavailable, MLflow and
    SQLAlchemy errors) and the machine refusing a write (OSError: disk full, quota,
    read-only, permissions). Stages write their outputs atomically, so on any of these the
    outputs of the previous run are left as they were. Anything else is a bug and keeps
    its traceback.
    """
    try:
        main()
    except (*USER_ERRORS, FetchError, TrackingUnavailable) as err:
        _fail(str(err))
    except OSError as err:
        advice = _OS_ADVICE.get(err.errno or 0, "")
        where = f": {err.filename}" if err.filename else ""
        _fail(f"{err.strerror or err}{where}" + (f"; {advice}" if advice else "")
              + "; the outputs of the previous run are unchanged")
    except Exception as err:
        if not _is_tracking_error(err):
            raise
        _fail(f"the MLflow store {display_uri(tracking_uri())} failed ({_first_line(err)}); rerun once it is "
              "back (outputs are written atomically, and training resumes from its last checkpoint)")


def _fail(message: str) -> None:
    if "tqdm" in sys.modules:  # a progress bar cut short leaves its line open: end it so the error has its own
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _is_tracking_error(err: BaseException) -> bool:
    """An error raised by MLflow or by the database under its store (only if they are loaded)."""
    kinds = []
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        kinds.append(MlflowException)
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.exc import SQLAlchemyError

        kinds.append(SQLAlchemyError)
    return isinstance(err, tuple(kinds))


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `out`; it replaces `out` only if the block succeeds.

    Temp dirs that killed runs left beside `out` (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`
    of a process that no longer exists) are removed first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(out)
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


def _remove_dead_siblings(out: Path) -> None:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)")
    for sibling in out.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
