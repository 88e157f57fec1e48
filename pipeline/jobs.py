"""What `idm upscale` will write: inputs (files and folders) mapped to output files, checked before any work.

`plan` expands folders (their images, or with `recursive` every image below them, keeping
subfolders under the output folder), names each output `<stem>_<suffix>.<ext>` in the
output folder, and refuses, before any pixel is decoded: two inputs that would write one
output, an output that would overwrite an input, an output folder that is a file or sits
where nothing can be written, and an alpha input asked to go to JPEG (which has no alpha).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.data.images import IMAGE_SUFFIXES, probe_alpha

OUTPUT_EXTS = ("png", "jpg", "webp")
_FORMAT_EXT = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}


@dataclass(frozen=True)
class Job:
    """One input file and the output file it becomes; `alpha`: the input has an alpha channel."""

    src: Path
    out: Path
    alpha: bool


def expand(inputs: list[Path], *, recursive: bool, skip: Path | None = None) -> list[tuple[Path, Path]]:
    """(file, its path relative to the output folder without suffix) for every input; a folder
    gives its images (all below it with `recursive`, except under `skip`, the output folder),
    sorted; hidden files and folders (a name starting with '.', like macOS's `._x.png`) are left
    out. ValueError for a folder with no images or one that is the output folder itself; files
    are checked later, by their reader."""
    out: list[tuple[Path, Path]] = []
    for item in inputs:
        if not item.is_dir():
            out.append((item, Path(item.stem)))
            continue
        if skip is not None and item.resolve() == skip.resolve():
            raise ValueError(f"--out {skip} is also an input folder; write the outputs to another folder")
        found = sorted(p for p in (item.rglob("*") if recursive else item.iterdir())
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p.relative_to(item))
                       and not (skip is not None and _inside(p, skip)))
        if not found:
            where = "in or below" if recursive else "directly in"
            hint = "" if recursive else " (--recursive looks in subfolders)"
            raise ValueError(f"{item}: no images {where} this folder{hint}; images are {', '.join(IMAGE_SUFFIXES)}")
        out += [(p, p.relative_to(item).with_suffix("")) for p in found]
    return out


def plan(inputs: list[Path], out: Path, *, suffix: str | Callable[[Path], str], ext: str,
         recursive: bool = False) -> list[Job]:
    """The jobs of one `idm upscale` call. `out` is the output folder, or the output file
    itself (an image suffix) when there is one input; `suffix` (or suffix(input file)) ends
    each output's stem after an underscore ('' for none); `ext` is one of OUTPUT_EXTS or
    'auto' (the input's format when png/jpg/webp, else png; png for alpha inputs from jpg).
    Raises ValueError, naming the files, for everything the module docstring lists."""
    single_file = out.suffix.lower() in _FORMAT_EXT
    if out.suffix.lower() in IMAGE_SUFFIXES and not single_file and not out.is_dir():
        raise ValueError(f"--out {out}: {out.suffix} is not an output format ({', '.join(OUTPUT_EXTS)}); "
                         "give one of those, or a folder")
    folder = out.parent if single_file else out
    _check_writable(folder)
    sources = expand(inputs, recursive=recursive, skip=None if single_file else out)
    if single_file and len(sources) != 1:
        raise ValueError(f"--out {out} names one file, but there are {len(sources)} inputs; give a folder")
    jobs = []
    for src, rel in sources:
        alpha = probe_alpha(src) if src.is_file() else False
        tail = suffix(src) if callable(suffix) else suffix
        if single_file:
            target, fmt = out, _FORMAT_EXT[out.suffix.lower()]
        else:
            fmt = _auto_ext(src, alpha) if ext == "auto" else ext
            name = f"{rel.name}_{tail}" if tail else rel.name
            target = folder / rel.parent / f"{name}.{fmt}"
        if alpha and fmt == "jpg":
            raise ValueError(f"{src} has an alpha channel, which JPEG cannot hold; use --ext png, webp or auto")
        jobs.append(Job(src, target, alpha))
    _refuse_collisions(jobs)
    return jobs


def _auto_ext(src: Path, alpha: bool) -> str:
    fmt = _FORMAT_EXT.get(src.suffix.lower(), "png")
    return "png" if alpha and fmt == "jpg" else fmt


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def check_suffix(text: str) -> str:
    """`text` as an output-name suffix: ValueError if it could leave the output folder or is no
    file name part (a path separator, '..', a control character)."""
    if any(sep in text for sep in ("/", "\\", os.sep)) or ".." in text or any(ord(c) < 32 for c in text):
        raise ValueError(f"--suffix {text!r}: must be part of a file name (no '/', '\\', '..' or control characters)")
    return text


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_writable(target: Path) -> None:
    """The output folder (or file's folder) exists as a folder, or can be created where the nearest existing parent is."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {target}: is a file; give a folder (or, for one input, an output file name)")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {target}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {target}: cannot write in {existing} (permission denied)")


def _refuse_collisions(jobs: list[Job]) -> None:
    by_out: dict[Path, Job] = {}
    inputs = {job.src.resolve(): job.src for job in jobs}
    for job in jobs:
        key = job.out.resolve()
        if key in inputs:
            raise ValueError(f"{job.src}: its output {job.out} would overwrite the input {inputs[key]}; "
                             "use another --out or --suffix")
        if key in by_out:
            raise ValueError(f"{by_out[key].src} and {job.src} would both be written to {job.out}; "
                             "nothing was done: use --suffix, --ext, or separate calls")
        by_out[key] = job
