"""House rules read from the source text: function size, import layering, docs that match the code.

Pure ``ast`` and text checks (nothing from sdltag is imported), so they run in a fraction of a second.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sdltag"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

MAX_FUNCTION_LINES = 80
MAX_NESTING = 4
NESTING_BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith, ast.Match)
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
LONG_MARK = re.compile(r"#\s*long:\s*\S")

# The tagging pipeline: turns paths into results; the output layer (writers) sits on top of it.
PIPELINE = ("tagger.py", "api.py", "results.py", "search.py", "matrixfile.py", "cells.py")


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ---- function size


def nesting(node: ast.AST, depth: int = 0) -> int:
    """The deepest control-flow nesting inside ``node``; nested functions and classes count on their own.

    An ``elif`` is a branch of its ``if``, not a block inside it (a flat chain of cases is not deep nesting)."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, SCOPES):
            continue
        step = isinstance(child, NESTING_BLOCKS) and not is_elif(node, child)
        deepest = max(deepest, nesting(child, depth + step))
    return deepest


def is_elif(parent: ast.AST, child: ast.AST) -> bool:
    """``child`` is written ``elif`` (an ``else:`` holding only an ``if`` is indented further)."""
    return (
        isinstance(parent, ast.If)
        and isinstance(child, ast.If)
        and parent.orelse == [child]
        and child.col_offset == parent.col_offset
    )


def function_sizes(source: str) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, int, int, bool]]:
    """(function, lines from ``def`` to its end, nesting, has a ``# long:`` reason right above it)."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            yield node, node.end_lineno - node.lineno + 1, nesting(node), bool(LONG_MARK.match(above))


def oversized(path: Path) -> list[str]:
    found = []
    for node, length, depth, excused in function_sizes(path.read_text(encoding="utf-8")):
        if (length > MAX_FUNCTION_LINES or depth > MAX_NESTING) and not excused:
            found.append(f"{rel(path)}:{node.lineno} {node.name} lines={length} nesting={depth}")
    return found


def test_size_checker_measures_lines_nesting_and_the_long_comment() -> None:
    deep = "def deep(x):\n" + "".join("    " * (i + 1) + "if x:\n" for i in range(5)) + "    " * 6 + "pass\n"
    long_body = "def long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    excused = "# long: one table of cases, read top to bottom\n@decorator\n" + long_body
    bare_mark = "# long:\n" + long_body
    nested = "def outer():\n    if a:\n        def inner():\n            if b:\n                pass\n"
    chain = "def chain(x):\n    if x == 1:\n        pass\n" + "".join(
        f"    elif x == {i}:\n        pass\n" for i in range(9)
    )
    nested_else = "def f(x):\n    if x:\n        pass\n    else:\n        if x:\n            pass\n"
    sources = (deep, long_body, excused, bare_mark, nested, chain, nested_else)
    sizes = {src: list(function_sizes(src)) for src in sources}
    assert [(n, d, e) for _, n, d, e in sizes[deep]] == [(7, 5, False)]
    assert [(n, d, e) for _, n, d, e in sizes[long_body]] == [(MAX_FUNCTION_LINES + 1, 0, False)]
    assert [e for *_, e in sizes[excused]] == [True]
    assert [e for *_, e in sizes[bare_mark]] == [False]  # a reason is required
    assert sorted((f.name, d) for f, _, d, _ in sizes[nested]) == [("inner", 1), ("outer", 1)]
    assert [d for _, _, d, _ in sizes[chain]] == [1]
    assert [d for _, _, d, _ in sizes[nested_else]] == [2]


def test_no_function_is_too_long_or_too_deeply_nested() -> None:
    found = [line for path in modules() for line in oversized(path)]
    assert not found, (
        f"functions over {MAX_FUNCTION_LINES} lines or nested deeper than {MAX_NESTING} "
        "(split them, or put '# long: <why>' right above the def):\n" + "\n".join(found)
    )


# ---- imports


def imports_in(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, at any level, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # `from sdltag.commands import tag` imports the module tag
                yield node.lineno, f"{base}.{alias.name}"


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def test_import_resolution_covers_relative_and_from_package_forms() -> None:
    source = "from . import tag\nfrom ._common import x\nimport sdltag.writers\nfrom ..writers import Tag\n"
    names = {name for _, name in imports_in(source, "sdltag.commands.probe")}
    assert {"sdltag.commands.tag", "sdltag.commands._common", "sdltag.writers"} <= names


def test_no_command_module_imports_another() -> None:
    commands = PACKAGE / "commands"
    names = {module_name(p) for p in commands.glob("*.py")} - {"sdltag.commands", "sdltag.commands._common"}
    found = []
    for path in sorted(commands.glob("*.py")):
        for line, name in imported_modules(path):
            if name in names and name != module_name(path):
                found.append(f"{rel(path)}:{line} imports {name}")
    assert not found, "command modules share code through sdltag/commands/_common.py or the library:\n" + "\n".join(
        found
    )


def test_the_tagging_pipeline_does_not_import_the_output_layer() -> None:
    found = []
    for name in PIPELINE:
        path = PACKAGE / name
        if not path.exists():
            continue
        for line, imported in imported_modules(path):
            if imported == "sdltag.writers":
                found.append(f"{rel(path)}:{line} imports {imported}")
    assert not found, "the pipeline's results live in the pipeline, writers import them:\n" + "\n".join(found)


# ---- docs/ARCHITECTURE.md


def architecture_entries() -> list[str]:
    """Paths in the first column of the module table: `sdltag/x/a.py`, `b.py` -> sdltag/x/a.py, sdltag/x/b.py."""
    entries = []
    for row in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        cells = row.split("|")
        if not row.startswith("|") or len(cells) < 3:
            continue
        folder = ""
        for item in re.findall(r"`([^`]+)`", cells[1]):
            if item.startswith("sdltag/"):
                folder = item if item.endswith("/") else item.rpartition("/")[0] + "/"
                entries.append(item)
            elif folder and re.fullmatch(r"[\w./]+", item):
                entries.append(folder + item)
    return entries


def trivial_package_init(path: Path) -> bool:
    """An ``__init__.py`` holding only a docstring and imports: the package's folder stands for it."""
    body = parse(path).body
    return path.name == "__init__.py" and all(
        isinstance(s, (ast.Import, ast.ImportFrom)) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        for s in body
    )


def test_architecture_lists_every_module() -> None:
    listed = set(architecture_entries())
    assert listed, "no module table found in docs/ARCHITECTURE.md"
    missing = []
    for path in modules():
        name = rel(path)
        if name in listed or (path.name == "__init__.py" and (rel(path.parent) + "/") in listed):
            continue
        if trivial_package_init(path):
            continue
        missing.append(name)
    assert not missing, "modules with no line in docs/ARCHITECTURE.md:\n" + "\n".join(missing)


def test_architecture_lists_only_modules_that_exist() -> None:
    gone = [entry for entry in architecture_entries() if not (ROOT / entry).exists()]
    assert not gone, "docs/ARCHITECTURE.md lists modules that do not exist:\n" + "\n".join(gone)


def test_architecture_table_parsing() -> None:
    entries = architecture_entries()
    assert "sdltag/cli.py" in entries
    # a bare name after a full path is a module in the same folder
    row = next(r for r in ARCHITECTURE.read_text(encoding="utf-8").splitlines() if "`sdltag/commands/tag.py`" in r)
    assert all(
        e.startswith("sdltag/commands/") for e in entries if e.rpartition("/")[2] in re.findall(r"`([^`/]+)`", row)
    )


def test_names_in_the_architecture_exist_in_the_code() -> None:
    """Functions, classes and options that docs/ARCHITECTURE.md names in backticks are found in sdltag/."""
    sources = [p.read_text(encoding="utf-8") for p in modules()]
    words = set(re.findall(r"\w+", "\n".join(sources))) | {p.stem for p in modules()}
    text = ARCHITECTURE.read_text(encoding="utf-8")
    stale = []
    for item in re.findall(r"`([^`]+)`", text):
        name = re.fullmatch(r"([A-Za-z_][\w.]*?)\.?(\(.*\))?", item)
        if name and name.group(1).split(".")[-1] not in words:
            stale.append(item)
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", text))
    stale += sorted(o for o in options if not any(f'"{o}"' in source for source in sources))
    assert not stale, "docs/ARCHITECTURE.md names what the code no longer has: " + ", ".join(stale)


# ---- documents the code and the docs point at


DOC_NAME = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.md)\b")
# File names inside a model folder, not documents of this repository.
MODEL_FOLDER_FILES = {"MODEL_CARD.md"}


def test_documents_named_in_the_package_exist() -> None:
    """`docs/SDL-METHOD.md` resolves from the repository root; a bare name only when it is a root file."""
    found = []
    for path in modules():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in DOC_NAME.findall(line):
                if name in MODEL_FOLDER_FILES or (ROOT / name).is_file():
                    continue
                hint = f" (did you mean docs/{name}?)" if (ROOT / "docs" / name).is_file() else ""
                found.append(f"{rel(path)}:{number} {name}{hint}")
    assert not found, "references to documents not in the repository:\n" + "\n".join(found)


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_paths_named_in_the_docs_exist(doc: str) -> None:
    """Relative links and `folder/NAME.md` paths in README.md and docs/ resolve from the repository root."""
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    text = path.read_text(encoding="utf-8")
    targets = {t for t in re.findall(r"\]\(([^)\s#]+)", text) if "://" not in t and not t.startswith("mailto:")}
    targets |= {t for t in DOC_NAME.findall(text) if "/" in t and not t.startswith("../")}
    gone = sorted(t for t in targets if not (ROOT / t).exists())
    assert not gone, f"{doc} names paths not in the repository: {gone}"


# ---- version and changelog


def test_version_and_changelog_agree() -> None:
    pyproject = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package = re.search(r'(?m)^__version__ = "([^"]+)"', (PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    assert pyproject and package and pyproject.group(1) == package.group(1)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"(?m)^## \[([^\]]+)\]", changelog)
    assert releases[0] == "Unreleased" and releases[1] == package.group(1), releases


def test_changelog_releases_have_one_heading_of_each_kind() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    order = ["Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"]
    for release in re.split(r"(?m)^(?=## \[)", changelog)[1:]:
        title = release.splitlines()[0]
        kinds = re.findall(r"(?m)^### (.+)$", release)
        assert len(kinds) == len(set(kinds)), f"{title}: repeated headings {kinds}"
        assert all(k in order for k in kinds), f"{title}: unknown heading in {kinds}"
        assert kinds == sorted(kinds, key=order.index), f"{title}: headings out of order {kinds}"


def test_tests_read_nothing_outside_the_repository() -> None:
    """Fixtures live under tests/, so a clean clone runs (not skips) every test."""
    outside = re.compile(r"\.\./shared|/work/shared")
    found = [
        f"{rel(path)}:{number}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if outside.search(line) and path.name != "test_house.py"
    ]
    assert not found, "tests that read files outside the repository:\n" + "\n".join(found)
