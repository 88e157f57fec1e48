"""The documentation holds together: every relative link in README.md, docs/*.md and
bench/README.md names a file of the repository, README.md stays short, and no file of the
repository points at files outside it (a clone has only the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# [text](target) and ![alt](target), and <img src="target">; a target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img\s[^>]*src=\"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# Files that live beside the repository on the machine it was written on, not in a clone.
# Datasets read by path (`../shared/datasets/<name>`, a command-line default) are allowed:
# they are data a user points at, not documents the repository relies on.
OUTSIDE = re.compile(r"REFERENCE\.md|DESIGN\.md|\.\./shared(?!/datasets\b)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md",
            ROOT / "recipes" / "README.md", ROOT / "idm" / "weights" / "MODEL_CARD.md"]


def links(text: str) -> list[str]:
    """Link targets of Markdown `text`, outside fenced code blocks and code spans."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return [a or b for a, b in LINK.findall(prose)]


def is_relative(target: str) -> bool:
    return not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith(("#", "/"))


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative link targets of `path` (anchors and queries ignored) that name no file or
    folder inside `root`."""
    broken = []
    for target in filter(is_relative, links(path.read_text(encoding="utf-8"))):
        file = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (path.parent / file).resolve()
        if not resolved.exists() or not resolved.is_relative_to(root):
            broken.append(target)
    return broken


def repo_text_files() -> list[Path]:
    """Files git tracks or would track (untracked but not ignored), text only, minus this test."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    files = []
    for name in filter(None, names):
        path = ROOT / name
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        with path.open("rb") as file:
            head = file.read(8192)
        if b"\0" not in head:  # binary files (images, weights) hold no references
            files.append(path)
    return files


def test_the_link_finder_sees_links_and_skips_code() -> None:
    text = ("See [the guide](docs/cli.md#flags), ![pic](docs/images/a.png) and <https://example.org>.\n"
            "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n[web](https://example.org/x.md) [here](#top)\n")
    assert links(text) == ["docs/cli.md#flags", "docs/images/a.png", "https://example.org/x.md", "#top"]
    assert [t for t in links(text) if is_relative(t)] == ["docs/cli.md#flags", "docs/images/a.png"]


def test_broken_links_reports_missing_files_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("[ok](b.md#x) [gone](c.md) [out](../../x.md) [up](../README.md)\n")
    (tmp_path / "docs" / "b.md").write_text("")
    (tmp_path / "README.md").write_text("")
    assert broken_links(tmp_path / "docs" / "a.md", tmp_path) == ["c.md", "../../x.md"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert broken_links(path) == [], f"{path.relative_to(ROOT)}: links to files that are not in the repository"


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, over {README_MAX_LINES}: "
                                       "move detail into docs/ and link to it")


def test_the_outside_pattern() -> None:
    found = [bool(OUTSIDE.search(t)) for t in ("see REFERENCE.md", "DESIGN.md, 3", "../shared/STYLE.md",
                                               "when ../shared is there", "../shared/datasets/Set5", "shared/x")]
    assert found == [True, True, True, True, False, False]


def test_nothing_refers_to_files_outside_the_repository() -> None:
    offenders = []
    for path in repo_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert offenders == [], "files outside the repository are referred to:\n" + "\n".join(offenders)
