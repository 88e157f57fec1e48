"""DVC stage entry points: `python -m pipeline.stages.<name>`, each a thin main()."""

from __future__ import annotations

import errno
import signal
import sys
import threading
from typing import Callable

from pipeline.data.fetch import FetchError
from pipeline.data.images import ImageReadError
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
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # unwinds like Ctrl-C
    try:
        main()
    except KeyboardInterrupt:
        _fail("interrupted; nothing half-written is left, the previous outputs stand (training resumes "
              "from its last checkpoint)", code=130)
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
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fail(message: str, code: int = 2) -> None:
    if "tqdm" in sys.modules:  # a progress bar cut short leaves its line open: end it so the error has its own
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


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
