"""The design document stays true: docs/ARCHITECTURE.md exists where the code cites it, cites sections it has, and its
layout (section 3) names exactly the modules the package holds; the benchmarks import as a package, never by
editing ``sys.path``. Fast: reads text files only."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs/ARCHITECTURE.md"
PACKAGE = REPO / "qrlora"
TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".txt", ".cfg"}
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", ".venv"}
# A repository path starting with docs/ (not a URL such as huggingface.co/docs/...).
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*\w")
CITATION = re.compile(r"[\w./-]*ARCHITECTURE\.md")  # a bare name, a shared path or docs/ARCHITECTURE.md
SITE_LINK = re.compile(r"\]\(ARCHITECTURE\.md(?=[#)])")  # a markdown link from another page of docs/
SECTION_CITATION = re.compile(r"docs/ARCHITECTURE\.md,?\s+(?:section|s\.)\s+(\w+)")


def _text_files():
    """Every text file of the repository but this one (its patterns are not citations)."""
    for path in sorted(REPO.rglob("*")):
        if path.suffix in TEXT_SUFFIXES and path.is_file() and not SKIP_DIRS & set(path.relative_to(REPO).parts) \
                and path != Path(__file__).resolve():
            yield path, path.read_text(encoding="utf-8", errors="replace")


def _layout_block() -> list[str]:
    """The lines of the fenced block of section 3 ("## 3. Layout")."""
    text = DOC.read_text()
    section = text.split("\n## 3. Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1].strip("\n").splitlines()


def _layout_package_entries() -> dict[str, str]:
    """``{module: description}`` of every entry indented under ``qrlora/`` (continuation lines joined). An entry
    line may name several modules before its description (``train.py evaluate.py ...``); each gets it."""
    entries, last = {}, []
    for line in _layout_block():
        if not line.startswith(" "):
            last = []  # a top-level folder (flux_dir/, tests/, ...): not a module of the package
        elif not line.startswith("   "):
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            names, description = parts[0].split(), (parts[1] if len(parts) > 1 else "")
            last = names
            for name in names:
                entries[name] = description.strip()
        else:
            for name in last:
                entries[name] = (entries[name] + " " + line.strip()).strip()
    return entries


def test_every_cited_docs_path_exists():
    cited = {}
    for path, text in _text_files():
        for found in DOCS_PATH.findall(text):
            cited.setdefault(found.rstrip("."), path.relative_to(REPO))
    assert "docs/ARCHITECTURE.md" in cited, "nothing cites the design document by its path"
    missing = {name: str(where) for name, where in cited.items() if not (REPO / name).exists()}
    assert not missing, f"cited but not in the repository: {missing}"


def test_the_design_document_is_cited_by_its_path_and_sections():
    headings = set(re.findall(r"^## (\w+)\. ", DOC.read_text(), flags=re.M))
    bare, sections = [], []
    for path, text in _text_files():
        if path == DOC:
            continue
        in_site = path.parent == DOC.parent  # a page of the docs site links it relative to itself
        for number, line in enumerate(text.splitlines(), 1):
            if in_site:
                line = SITE_LINK.sub("](docs/ARCHITECTURE.md", line)
            if any(found != "docs/ARCHITECTURE.md" for found in CITATION.findall(line)):
                bare.append(f"{path.relative_to(REPO)}:{number}")
            sections += [(f"{path.relative_to(REPO)}:{number}", s) for s in SECTION_CITATION.findall(line)]
    assert not bare, f"cite the design document as docs/ARCHITECTURE.md: {bare}"
    assert sections, "no code cites a section of docs/ARCHITECTURE.md"
    wrong = [(where, s) for where, s in sections if s not in headings]
    assert not wrong, f"cited sections that docs/ARCHITECTURE.md does not have (it has {sorted(headings)}): {wrong}"


def test_the_layout_names_modules_that_exist():
    entries = _layout_package_entries()
    assert "core/" in entries and "cli/" in entries and "train.py" in entries  # the parser found the entries
    for name, description in entries.items():
        target = PACKAGE / name
        if name.endswith("/"):
            assert (target / "__init__.py").is_file(), f"layout names {name}, qrlora/{name} is not a package"
            # Files a package entry names (``backbones/ base.py (...), sd3.py``) are in that package, and every
            # module and subpackage of it is named.
            named = set(re.findall(r"\b[\w]+\.py\b", description)) | set(re.findall(r"\b([\w]+/)", description))
            for inner in named:
                assert (target / inner).exists(), f"layout: qrlora/{name}{inner} does not exist"
            held = {p.name for p in target.glob("*.py") if p.name != "__init__.py"} | \
                {f"{p.name}/" for p in target.iterdir() if (p / "__init__.py").is_file()}
            assert not held - named, f"docs/ARCHITECTURE.md section 3: qrlora/{name} does not describe {sorted(held - named)}"
        else:
            assert name.endswith(".py") and target.is_file(), f"layout names qrlora/{name}, which does not exist"
    for line in _layout_block():
        if not line.startswith(" "):  # top-level folders: qrlora/, flux_dir/ SD3_dir/ SDXL_dir/, scripts/, ...
            for folder in re.findall(r"(?:^|\s)([\w]+/)(?=\s)", line.split("  ")[0] + " "):
                assert (REPO / folder).is_dir(), f"layout names {folder}, which is not a folder of the repository"


def test_every_module_of_the_package_is_in_the_layout():
    entries = _layout_package_entries()
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    missing = sorted((modules | packages) - set(entries))
    assert not missing, f"docs/ARCHITECTURE.md section 3 does not describe: {missing}"


def test_benchmarks_import_as_a_package_without_sys_path():
    assert (REPO / "bench" / "__init__.py").is_file()
    offenders = [p.name for p in sorted((REPO / "bench").glob("*.py")) if "sys.path" in p.read_text()]
    assert not offenders, f"bench scripts import their helpers as bench modules (python -m bench.X): {offenders}"


def test_the_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` (as .ci/run runs it): a broken link or anchor, a missing page or a page left out of
    the nav fails here too, not only in CI."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "merging" / "index.html").is_file()
