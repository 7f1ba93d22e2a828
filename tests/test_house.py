"""The house rules a newcomer relies on: no import circles inside ``mrpf``, and every relative
link and anchor in README.md and docs/*.md leads somewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mrpf"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions alike."""
    name = package.name
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        tree = ast.parse((package / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names
                           if a.name.startswith(name + ".") and a.name.count(".") >= 1]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 0 and base != name and not base.startswith(name + "."):
                    continue
                if node.level > 1:
                    continue
                parts = base.split(".") if node.level == 0 else [name, *base.split(".")] if base else [name]
                if len(parts) > 1 and parts[1]:
                    targets = [parts[1]]
                else:   # `from . import a, b` / `from mrpf import a`
                    targets = [a.name for a in node.names if a.name in modules]
            else:
                continue
            graph[module].update(t for t in targets if t in modules and t != module)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected set of two or more modules (Tarjan 1972), as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, c) for c in components]


def _cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One import path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_mrpf_has_no_import_cycle():
    cycles = import_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles in mrpf: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_names_a_planted_cycle_and_passes_a_chain(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "floor.py").write_text("import os\n")
    (package / "a.py").write_text("from .floor import x\nfrom . import b\n")
    (package / "b.py").write_text("def late():\n    from pkg.c import y\n")
    (package / "c.py").write_text("import pkg.floor\n")
    assert import_cycles(import_graph(package)) == []
    (package / "c.py").write_text("def late():\n    from .a import z   # inside a function: still a cycle\n")
    assert import_cycles(import_graph(package)) == [["a", "b", "c", "a"]]


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|<a href=\"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens, repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip()
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(files: list[Path]) -> list[str]:
    """'FILE: TARGET' for each relative link whose file, or whose #anchor, does not exist."""
    broken = []
    for path in files:
        for match in LINK.finditer(_prose(path.read_text())):
            target = match.group(1) or match.group(2)
            if re.match(r"^[a-z]+:", target):     # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    assert broken_links(DOCS) == []


def test_the_link_check_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# The pipeline: Snakemake, DVC\n\n## Seeds and runs\n")
    doc = tmp_path / "README.md"
    doc.write_text("[ok](other.md#the-pipeline-snakemake-dvc) [ok](#top) [web](https://x.org/a)\n"
                   "# Top\n`[code](missing.md)`\n")
    assert broken_links([doc]) == []
    doc.write_text("# Top\n[gone](missing.md) [anchor](other.md#seeds) [self](#nowhere)\n")
    assert broken_links([doc]) == ["README.md: missing.md (no such file)",
                                   "README.md: other.md#seeds (no such heading)",
                                   "README.md: #nowhere (no such heading)"]


BENCH_RESULTS = ROOT / "bench" / "results"


def test_bench_results_holds_exactly_the_files_the_docs_quote():
    """Every result file is named where its figures are quoted (docs/performance.md's table of
    result files, or another doc), and every result file a doc names exists."""
    text = "\n".join(path.read_text() for path in DOCS)
    named = set(re.findall(r"`([\w.-]+\.json)`", text)) | set(re.findall(r"bench/results/([\w.-]+\.json)", text))
    present = {p.name for p in BENCH_RESULTS.glob("*.json")}
    assert sorted(present - named) == [], "result files no doc quotes"
    quoted = {n for n in named if re.match(r"^(throughput|pruned|gpu-profile|mrs-cost|op-costs|planning)", n)}
    assert sorted(quoted - present) == [], "result files the docs quote but bench/results lacks"
