"""The repository stands on its own: every document a file cites (docstrings, comments, docs) and every
relative link in the Markdown docs is a file of this repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A path-like word naming a Markdown document (docs/design.md, say).
DOCUMENT = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")
# A relative path that climbs out of its folder: two dots, a slash, a name.
CLIMBING = re.compile(r"(?<![A-Za-z0-9_.])\.\./[A-Za-z0-9_./-]+")
# [text](target) in Markdown; the target up to a space or the closing parenthesis.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _files() -> list[Path]:
    """The repository's files: tracked ones and new ones not ignored."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git checkout to list the repository's files")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _inside(path: Path) -> bool:
    resolved = path.resolve()
    return resolved == ROOT or ROOT in resolved.parents


def _resolves(name: str, cited_from: Path, names: set[str]) -> bool:
    """A cited path names a file of this repository, relative to the citing file or to the root. A cited
    document may also be a name of one anywhere in it: code builds paths (`ROOT / "docs" / ...`, an
    output folder's README.md) that are not written out whole. A path that climbs out must resolve."""
    if name.endswith(".md") and not name.startswith("../") and name.rsplit("/", 1)[-1] in names:
        return True
    return any(_inside(base / name) and (base / name).exists() for base in (cited_from.parent, ROOT))


def test_every_document_a_file_cites_is_in_the_repository():
    missing = []
    files = _files()
    names = {path.name for path in files}
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for name in DOCUMENT.findall(line) + CLIMBING.findall(line):
                if not _resolves(name.rstrip("."), path, names):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not missing, "citations of documents that are not in the repository:\n" + "\n".join(missing)


def test_every_relative_link_in_the_markdown_docs_resolves():
    broken = []
    documents = [p for p in _files() if p.suffix == ".md"]
    assert ROOT / "README.md" in documents and ROOT / "docs/design.md" in documents
    for path in documents:
        for target in LINK.findall(path.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            local = target.split("#", 1)[0]
            if not (_inside(path.parent / local) and (path.parent / local).exists()):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "relative links that do not resolve to a file of the repository:\n" + "\n".join(broken)
