"""The project carries its own design notes: every ``docs/...md`` citation (with an optional ``§n``) in
the code, benchmarks, tests, recipes and README resolves to a file and a numbered heading in this
repository, no section is cited without naming its document, and no tracked file points outside the
repository for its documentation."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["saq_deploy", "benchmarks", "tests", "calibration", "docker", "README.md", "Makefile"]
SUFFIXES = {".py", ".md", ".toml", ".sh", ".yaml", ".yml", ""}

# A document path, then any run of section marks joined by "-", ",", "and" (e.g. "§2-§3", "§1.2, §1.4").
# "method.md" / "deployment.md" alone are short for docs/design/ (long docstring lines stay < 110 chars).
CITATION = re.compile(r"(docs/[\w./-]+?\.md|(?<![\w/])(?:method|deployment)\.md)"
                      r"((?:(?:\s*(?:[-–,]|and)\s*|\s+)§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4}\s+§(\d+(?:\.\d+)*)\b", re.MULTILINE)
# Built from pieces so this file does not match its own check.
FORBIDDEN = ["../" + "shared", "deployment" + "-facts", "saq" + "-method.md", "method " + "doc "]


def _scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                      and "__pycache__" not in p.parts]
    return files


def _headings(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def _citation_problems(text: str, where: str, own: Path | None = None) -> list[str]:
    """``own``: the design note being checked, whose bare ``§n`` are references to itself."""
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        rest = line
        for match in CITATION.finditer(line):
            name = match.group(1)
            doc = ROOT / (name if name.startswith("docs/") else f"docs/design/{name}")
            if not doc.is_file():
                problems.append(f"{where}:{lineno}: {name} does not exist")
                continue
            missing = [s for s in SECTION.findall(match.group(2)) if s not in _headings(doc)]
            problems += [f"{where}:{lineno}: {name} has no heading §{s}" for s in missing]
            rest = rest.replace(match.group(0), "")
        if own is not None:
            problems += [f"{where}:{lineno}: no heading §{s} in this file"
                         for s in SECTION.findall(rest) if s not in _headings(own)]
        elif SECTION.search(rest):
            problems.append(f"{where}:{lineno}: cites a § without naming its docs/...md file")
    return problems


def test_every_docs_citation_resolves_to_a_file_and_section():
    problems = []
    for path in _scanned_files():
        if path == Path(__file__).resolve():
            continue
        problems += _citation_problems(path.read_text(encoding="utf-8", errors="replace"),
                                       str(path.relative_to(ROOT)))
    for note in sorted((ROOT / "docs" / "design").glob("*.md")):
        problems += _citation_problems(note.read_text(encoding="utf-8"), str(note.relative_to(ROOT)), own=note)
    assert not problems, "\n".join(problems)


def test_checker_catches_a_missing_file_a_missing_section_and_a_bare_section():
    # The checker itself must be able to fail, or the test above proves nothing.
    assert _citation_problems("see docs/design/method.md §2.2", "x") == []
    assert _citation_problems("see docs/design/method.md §2-§3", "x") == []
    assert _citation_problems("see docs/design/nope.md", "x")
    assert _citation_problems("see docs/design/method.md §99", "x")
    assert _citation_problems("see docs/design/method.md §2-§99", "x")
    assert _citation_problems("(MOTA, method.md §2)", "x") == []
    assert _citation_problems("(MOTA, §2)", "x")
    assert _citation_problems("see docs/design/deployment.md §1.4 and §4.9", "x")
    method = ROOT / "docs" / "design" / "method.md"
    assert _citation_problems("as in §1.4", "x", own=method) == []
    assert _citation_problems("as in §42", "x", own=method)


def test_design_docs_exist_with_numbered_sections():
    for name in ("README.md", "method.md", "deployment.md"):
        assert (ROOT / "docs" / "design" / name).is_file(), f"docs/design/{name} is missing"
    for name in ("method.md", "deployment.md"):
        assert len(_headings(ROOT / "docs" / "design" / name)) >= 5, f"docs/design/{name}: too few § headings"


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def test_no_tracked_file_points_at_documents_outside_the_repository():
    problems = []
    for path in _tracked_files():
        if path == Path(__file__).resolve():
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue  # binary (PNG, weights)
        text = data.decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            problems += [f"{path.relative_to(ROOT)}:{lineno}: mentions {word!r}"
                         for word in FORBIDDEN if word in line.lower()]
    assert not problems, "\n".join(problems)
