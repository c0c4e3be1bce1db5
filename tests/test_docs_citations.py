"""Every "METHODS.md §x.y" cited in the code is a section heading of docs/METHODS.md.

Scanned: the .py files under nnunet_semisam/, trainers/, planners/, benchmarks/ and README.md. Citation forms:
`METHODS.md §4.1`, `METHODS.md 3.3`, `METHODS.md section 4.2` (log lines use ASCII), bare `§2.4` / `§4`, and ranges
`§1.2-1.3` (both ends). A `§` right after a source tag (`[KD] §1.2`, `seed 000 §3.1`) cites a section of that paper,
not of METHODS.md, and is skipped. Headings count when they start with their number: `## 4. ...`, `### 4.1 ...`.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "METHODS.md"
SCANNED_DIRS = ("nnunet_semisam", "trainers", "planners", "benchmarks")
SCANNED_FILES = ("README.md",)

HEADING = re.compile(r"^#+ (\d+(?:\.\d+)*)\b", re.MULTILINE)
NUMBER = r"\d+(?:\.\d+)*"
# "METHODS.md §4.1", "METHODS.md 3.3", "METHODS.md section 4.2"; a Python string split across lines
# ("... METHODS.md section "\n    "2.2) ...") is followed into its continuation
NAMED = re.compile(r"METHODS\.md[ \t]*(?:§[ \t]*|section(?:[ \t]+|[ \t]*[\"'][ \t]*\n[ \t]*[rbfuRBFU]*[\"']))?"
                   rf"({NUMBER})(?:[-–]({NUMBER}))?")
BARE = re.compile(rf"§[ \t]*({NUMBER})(?:[-–]({NUMBER}))?")
# a bare § that cites another document: "[KD] §1.2", "[SSP] §6", "seed 000 §3.1"
EXTERNAL = re.compile(r"(?:\[[A-Za-z0-9+&]+\]|\bseeds?[ \t]+\d+)[ \t]*$")


def doc_sections(text: str) -> set[str]:
    return set(HEADING.findall(text))


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def citations(text: str) -> list[tuple[int, str]]:
    """(line, section number) of every METHODS.md citation in `text`, without duplicates on a line."""
    found: list[tuple[int, str]] = []
    for m in NAMED.finditer(text):
        found += [(_line(text, m.start()), n) for n in m.groups() if n]
    for m in BARE.finditer(text):
        if EXTERNAL.search(text[max(0, m.start() - 20):m.start()]):
            continue
        found += [(_line(text, m.start()), n) for n in m.groups() if n]
    return sorted(set(found))


def scanned_files() -> list[Path]:
    files = [p for d in SCANNED_DIRS for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]
    return files + [ROOT / f for f in SCANNED_FILES if (ROOT / f).is_file()]


def test_citation_parser_forms():
    text = ('"""METHODS.md §4.1 and §4.3; METHODS.md 3.3; [KD] §1.2, seed 000 §3.1; §1.2-1.3."""\n'
            'log(f"polarity (METHODS.md section 4.2)")\n'
            'help="resize of METHODS.md section "\n'
            '     "2.2) of the next cases"\n')
    assert citations(text) == [(1, "1.2"), (1, "1.3"), (1, "3.3"), (1, "4.1"), (1, "4.3"), (2, "4.2"), (3, "2.2")]
    assert doc_sections("## 4. KD\n### 4.1 FPKDM\n#### 4.1.2 x\ntext 5.1\n##No 6\n") == {"4", "4.1", "4.1.2"}


def test_methods_doc_has_sections_1_to_9():
    assert DOC.is_file(), f"{DOC} is missing"
    text = DOC.read_text(encoding="utf-8")
    numbers = HEADING.findall(text)
    missing = [str(i) for i in range(1, 10) if str(i) not in numbers]
    assert not missing, f"docs/METHODS.md lacks top-level sections {missing}"
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not duplicates, f"docs/METHODS.md has duplicate section numbers {duplicates}"


def test_every_cited_section_exists():
    assert DOC.is_file(), f"{DOC} is missing"
    sections = doc_sections(DOC.read_text(encoding="utf-8"))
    cited, missing = 0, []
    for path in scanned_files():
        for line, number in citations(path.read_text(encoding="utf-8")):
            cited += 1
            if number not in sections:
                missing.append(f"{path.relative_to(ROOT)}:{line}: §{number}")
    assert cited > 50, f"only {cited} citations found: the scanner is probably broken"
    assert not missing, ("citations of sections that docs/METHODS.md does not have:\n  " + "\n  ".join(missing))

