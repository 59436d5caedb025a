"""Every citation in the sources can be followed from a clone of this repository.

* No comment, docstring or README cites a note that lives outside the repository (the workplace's
  ABI sheet, style guide, layout proposal, prior-art and peer notes) by its bare name or by a path
  outside the tree; what the code needs of them is in ``docs/``.
* Every ``docs/<name>.md`` a source names exists, and so does every section it cites by number
  (``docs/xen-abi.md §5``, ``§10.14``, ``docs/peers.md §1a``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SUFFIXES = {".py", ".sh", ".service", ".md", ".toml", ".txt", ".tsv", ".cfg", ".ini"}
NAMES = {"Makefile"}
SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules"}

# Notes kept outside the repository, by stem (spelled apart so that this file does not cite them).
OUTSIDE_STEMS = ("abi", "STYLE", "LAYOUT", "prior-art", "peers", "xen-lab")
OUTSIDE = {f"{stem}.md" for stem in OUTSIDE_STEMS}
MD_PATH = re.compile(r"[\w./-]+\.md\b")
# The same notes cited without ".md" ("STYLE §2.4", "LAYOUT rule 3"), and paths out of the tree.
_UPPER = "|".join(stem for stem in OUTSIDE_STEMS if stem.isupper())
BARE = re.compile(rf"\b(?:{_UPPER})\s*(?:§|rule\s+\d)")
OUT_OF_TREE = re.compile(r"(?:/work/|\.\./shared/|\bshared/reference/)")
DOCS_CITE = re.compile(r"\bdocs/([\w.-]+\.md)\b(?:`{0,2})\s*(?:§\s*(\d+[a-z]?(?:\.\d+)?))?")


def source_files() -> Iterator[Path]:
    for top in sorted(REPO.iterdir()):
        if top.name.startswith(".") or top.name in SKIP_DIRS or top.name.endswith(".egg-info"):
            continue
        candidates = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in candidates:
            if any(part in SKIP_DIRS or part.startswith(".") for part in path.relative_to(REPO).parts):
                continue
            if path.is_file() and (path.suffix in SUFFIXES or path.name in NAMES):
                yield path


def outside_citations(text: str) -> list[str]:
    """What in ``text`` cites a note outside the repository (empty when nothing does)."""
    found: list[str] = []
    for m in MD_PATH.finditer(text):
        token = m.group(0)
        if "docs/" in token:
            continue
        if token.rsplit("/", 1)[-1] in OUTSIDE or OUT_OF_TREE.search(token):
            found.append(token)
    found.extend(m.group(0) for m in BARE.finditer(text))
    found.extend(m.group(0) for m in OUT_OF_TREE.finditer(text))
    return found


def has_section(doc: str, section: str) -> bool:
    """``doc`` has a heading numbered ``section`` ("5", "1a"), or for "10.14" a heading 10 with an
    item 14 after it."""
    top, _, item = section.partition(".")
    heading = re.search(rf"^#+ {re.escape(top)}\. ", doc, re.MULTILINE)
    if heading is None:
        return False
    return not item or re.search(rf"^\s*{re.escape(item)}\. ", doc[heading.end():], re.MULTILINE) is not None


def broken_docs_citations(text: str) -> list[str]:
    """``docs/<name>.md [§N]`` citations in ``text`` whose file or section does not exist."""
    broken: list[str] = []
    for m in DOCS_CITE.finditer(text):
        name, section = m.group(1), m.group(2)
        doc = DOCS / name
        if not doc.is_file():
            broken.append(m.group(0))
        elif section and not has_section(doc.read_text(encoding="utf-8"), section):
            broken.append(m.group(0))
    return broken


def _per_file(check: Callable[[str], list[str]]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for path in source_files():
        if path == Path(__file__).resolve():  # its examples are the counter-examples, on purpose
            continue
        hits = check(path.read_text(encoding="utf-8", errors="replace"))
        if hits:
            result[str(path.relative_to(REPO))] = hits
    return result


def test_the_scan_sees_the_sources() -> None:
    seen = {str(p.relative_to(REPO)) for p in source_files()}
    assert {"xen_vhost_master/supervisor.py", "README.md", "docs/xen-abi.md"} <= seen
    assert not any(s.startswith((".venv/", ".git/")) for s in seen)


N = {stem: f"{stem}.md" for stem in OUTSIDE_STEMS}


@pytest.mark.parametrize("text", [
    f"see {N['abi']} §5", f"({N['STYLE']} rule 9)", "Typed errors (STYLE §2.4)", f"../shared/{N['LAYOUT']}",
    f"verified in /work/shared/reference/{N['peers']}:", f"``../shared/reference/{N['abi']}`` §9",
    f"the {N['prior-art']} notes", N["xen-lab"],
])
def test_an_outside_citation_is_found(text: str) -> None:
    assert outside_citations(text)


@pytest.mark.parametrize("text", [
    "docs/xen-abi.md §5", "``docs/vhost-user-wire.md`` §2", "../docs/peers.md", "tests/xenlab/README.md",
    "QEMU docs/interop/vhost-user.rst", "STYLE_RULES", "the ABI",
])
def test_a_citation_inside_the_repository_is_not_flagged(text: str) -> None:
    assert not outside_citations(text)


def test_no_source_cites_a_note_outside_the_repository() -> None:
    assert _per_file(outside_citations) == {}


def test_a_missing_doc_or_section_is_found() -> None:
    assert broken_docs_citations("docs/no-such-page.md") == ["docs/no-such-page.md"]
    assert broken_docs_citations("docs/xen-abi.md §99") == ["docs/xen-abi.md §99"]
    assert broken_docs_citations("docs/xen-abi.md §10.99") == ["docs/xen-abi.md §10.99"]
    assert broken_docs_citations("docs/xen-abi.md §5 and docs/xen-abi.md §10.14, docs/peers.md §1a") == []


def test_every_docs_page_and_section_a_source_names_exists() -> None:
    assert _per_file(broken_docs_citations) == {}
