"""The design notes in docs/: every ``docs/<page>.md#<section>`` cited anywhere in the repo exists."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "runs", "__pycache__", "mome.egg-info", "node_modules"}
CITATION = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
LINK = re.compile(r"\]\(([\w-]+\.md)?#([\w-]+)\)")  # markdown links inside docs/


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped (hyphens and underscores kept), spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", page.read_text(encoding="utf-8"), re.M)}


def repo_files():
    """Source, config and documentation files of the repository (virtual environments and run folders pruned)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".venv")]
        for name in files:
            if name.endswith((".py", ".md", ".yaml", ".sh")):
                yield Path(folder) / name


def test_slug_matches_github_anchors():
    assert slug("AV-HuBERT") == "av-hubert"
    assert slug("Video front end") == "video-front-end"
    assert slug("Decisions where the papers are silent") == "decisions-where-the-papers-are-silent"


def test_every_cited_docs_section_exists():
    missing = []
    for f in repo_files():
        for page, anchor in CITATION.findall(f.read_text(encoding="utf-8", errors="replace")):
            target = ROOT / "docs" / page
            if not target.is_file():
                missing.append(f"{f.relative_to(ROOT)}: docs/{page} does not exist")
            elif anchor and anchor not in anchors(target):
                missing.append(f"{f.relative_to(ROOT)}: docs/{page} has no section '#{anchor}'")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_links_between_docs_pages_resolve(page):
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    broken = []
    for target, anchor in LINK.findall(text):
        path = ROOT / "docs" / (target or page)
        if not path.is_file() or anchor not in anchors(path):
            broken.append(f"{target or page}#{anchor}")
    assert not broken, f"docs/{page}: broken links {broken}"


def test_the_code_cites_only_documents_the_repo_contains():
    """Design notes live in docs/: no file points at notes kept outside the repository."""
    outside = re.compile(r"\b(MOME|DECISIONS|ENVIRONMENT|CONTRACTS|ANCHORS)\.md\b")
    this = Path(__file__).resolve()
    found = [f"{f.relative_to(ROOT)}:{i}" for f in repo_files() if f.resolve() != this
             for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not found, f"citations of notes outside the repo: {found}"
