"""README.md and docs/ stay inside the repository and point at files that exist.

Pure file reads, no imports of the project: every relative markdown link (and image) resolves to an
existing file inside the repository and has no #anchor (an anchor cannot be checked by a file's
existence), no link or address leaves the repository, every path of a known kind named in code
(inline `...` or a fenced block) under one of the repository's top-level folders exists, and every
docs page is reachable from the README."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
ADDRESS = re.compile(r"\b(?:https?|ftp|file)://|\bmailto:|\bwww\.", re.I)
# A path with a known extension that is not the middle of a longer path or a word.
NAMED_PATH = re.compile(r"(?<![\w./~$-])((?:[\w.-]+/)+[\w.-]+\.(?:py|sh|yaml|md|json|png|csv|txt))(?![\w/-])")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code, where markdown links live."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def _code(text: str) -> list[str]:
    """Inline code spans and the contents of fenced blocks."""
    blocks = FENCE.findall(text)
    return INLINE_CODE.findall(FENCE.sub("", text)) + blocks


def _top_level_folders() -> set[str]:
    return {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_pages_exist():
    assert (REPO / "README.md").is_file()
    assert len(PAGES) > 1, "docs/ holds no pages"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve_inside_the_repository(page):
    problems = []
    for target in _links(_text(page)):
        if ADDRESS.search(target) or target.startswith(("/", "//")) or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            problems.append(f"{target}: leaves the repository (link only to files in it)")
            continue
        if "#" in target:
            problems.append(f"{target}: has an anchor (link the file; name the section in words)")
            continue
        resolved = (page.parent / target).resolve()
        if not resolved.is_relative_to(REPO):
            problems.append(f"{target}: resolves outside the repository ({resolved})")
        elif not resolved.exists():
            problems.append(f"{target}: no such file ({resolved.relative_to(REPO)})")
    assert not problems, f"{_name(page)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_no_address_outside_the_repository(page):
    """No web address anywhere, linked or not: a reader of the repository gets everything from it
    (arXiv ids are cited as plain text)."""
    hits = [line.strip() for line in _text(page).splitlines() if ADDRESS.search(line) or "../shared" in line]
    assert not hits, f"{_name(page)} points outside the repository:\n  " + "\n  ".join(hits)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_named_paths_exist(page):
    """Paths are written from the repository root (`model/layer.py`), also inside docs/."""
    folders = _top_level_folders()
    missing = sorted({path for code in _code(_text(page)) for path in NAMED_PATH.findall(code)
                      if path.split("/", 1)[0] in folders and not (REPO / path).exists()})
    assert not missing, f"{_name(page)} names files that do not exist:\n  " + "\n  ".join(missing)


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached or page.suffix != ".md" or not page.is_file():
            continue
        reached.add(page)
        todo += [(page.parent / target).resolve() for target in _links(_text(page)) if "://" not in target]
    unreached = [_name(page) for page in PAGES if page not in reached]
    assert not unreached, f"docs pages no link leads to from README.md: {unreached}"
