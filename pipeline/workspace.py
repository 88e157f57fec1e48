"""The workspace's own files: stage outputs swapped in whole, leftovers of killed runs removed."""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from idm.files import process_exists, replace_dir


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
        replace_dir(tmp, out, backup=out.parent / f".{out.name}.old-{os.getpid()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_siblings(out: Path) -> None:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)")
    for sibling in out.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and int(match.group(1)) != os.getpid() and not process_exists(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)
