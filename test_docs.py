"""
The docs hold what was measured, stamped by the script that printed it.

- Every results table in docs/ (a Markdown table, or a box table that a script printed) stands
  under the stamp that startup.stamp writes: UTC date and time, machine, torch, commit (dirty
  when the tree had changes), dtype and the exact command. A table printed before the scripts
  stamped their output carries the same fields with the date alone and says "reconstructed".
  A table that is no measurement (a name map, the paper's numbers) says so right above it.
- Every number in the README's results table, and its command, appears on a docs page
  its row links to.

    python -m pytest -q test_docs.py
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
REFERENCE = "<!-- reference table: not a measurement -->"
STAMP = re.compile(
    r"^> \*\*\d{4}-\d{2}-\d{2}(?P<time> \d{2}:\d{2} UTC)?\*\* · [^·]+ · torch \S+ · "
    r"commit (?:[0-9a-f]{7,40}(?:-dirty)?|unknown) · (?:float32|bfloat16) · `[^`]+`"
    r"(?P<reconstructed> · reconstructed: .+)?$")
BOX = re.compile(r"[┃│┏┡╭]")


def stamped(line: str) -> bool:
    m = STAMP.match(line)
    return bool(m) and (m["time"] is not None or m["reconstructed"] is not None)


def tables(text: str):
    """(line number, kind) of each table's first line: 'md' for | a | b | with a |---| row
    under it, 'box' for a fenced block holding a box-drawn table."""
    lines, fenced, found = text.splitlines(), None, []
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = i if fenced is None else None
            continue
        if fenced is not None:
            if BOX.search(line) and (not found or found[-1][0] != fenced):
                found.append((fenced, "box"))
        elif (line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-")
              and (i == 0 or not lines[i - 1].startswith("|"))):
            found.append((i, "md"))
    return found


def unstamped_tables(text: str) -> list[int]:
    """Line numbers (1-based) of tables with neither a stamp in their section above them
    nor the reference marker right above them."""
    lines, bad = text.splitlines(), []
    for start, _ in tables(text):
        above = [l for l in lines[:start] if l.strip()]
        if above and above[-1].strip() == REFERENCE:
            continue
        ok = False
        for line in reversed(above):
            if line.startswith("#") and not line.startswith("#!"):
                break
            if stamped(line):
                ok = True
                break
        if not ok:
            bad.append(start + 1)
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_results_table_stands_under_a_stamp(page):
    bad = unstamped_tables(page.read_text())
    assert not bad, (f"{page.name}: tables at lines {bad} have no stamp (startup.stamp's line "
                     f"above them in their section) and no '{REFERENCE}' right above them")


def test_the_lint_finds_a_table_without_a_stamp():
    good = ("# t\n\n> **2026-12-04 18:31 UTC** · AMD EPYC, 2 cores · torch 2.13.0+cpu · "
            "commit 587525b-dirty · float32 · `python study.py`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert unstamped_tables(good) == []
    assert unstamped_tables(good.replace("18:31 UTC", "")) == [5]     # neither time nor reason
    assert unstamped_tables(good + "\n## next\n\n| c |\n|---|\n") == [11]   # a new section
    assert unstamped_tables("# t\n```\n┏━━┓\n┃ a┃\n```\n") == [2]
    assert unstamped_tables(f"{REFERENCE}\n| a |\n|---|\n") == []


NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?%?")


def results_rows():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [l for l in section.splitlines() if l.startswith("|") and not l.startswith("|-")]
    for row in rows[1:]:  # past the header
        claim, measured, command, page = [c.strip() for c in row.strip("|").split(" | ")]
        links = re.findall(r"\]\((docs/[\w.-]+\.md)\)", page)
        yield claim[:50], measured, command.strip("`"), links


@pytest.mark.parametrize("claim, measured, command, links", list(results_rows()),
                         ids=[r[0] for r in results_rows()])
def test_every_number_in_the_readme_results_is_on_its_page(claim, measured, command, links):
    assert links, f"row {claim!r} links to no docs page"
    pages = "\n".join((ROOT / l).read_text() for l in links)
    # as the stamp wrote it (a process cannot see torchrun's --standalone)
    stamps = [l for l in pages.splitlines() if stamped(l)]
    assert any(f" · `{command.replace(' --standalone', '')}`" in l for l in stamps), \
        f"row {claim!r}: no stamp on {links} names the command {command!r}"
    missing = [n for n in NUMBER.findall(measured)
               if ("." in n or "," in n) and n.lstrip("+-") not in pages]
    assert not missing, f"row {claim!r}: {missing} appear on none of {links}"


PROCESS_WORDS = ["no GPU has been available", "loaded machine", "other jobs' load", "out/dev/",
                 "throwaway", "this session", "teammate", "issue #", " I ", " we "]


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=["README.md", *[p.name for p in PAGES]])
def test_docs_speak_of_the_project_not_of_its_making(page):
    text = page.read_text()
    found = [w for w in PROCESS_WORDS if w in text]
    assert not found, f"{page.name} says {found}"
