"""The code's shape: layers that only import downwards, short files and functions, no private names across modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("genevolve", "studio", "benchmarks", "scripts", "tests") for p in sorted((ROOT / d).rglob("*.py"))]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, relative ones resolved against its package."""
    rel = path.relative_to(ROOT).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append((mod, [a.name for a in node.names]))
    return out


def test_no_file_over_500_lines_and_no_function_over_80():
    long_files, long_functions = [], []
    for p in CODE:
        text = p.read_text("utf-8")
        if len(text.splitlines()) > 500:
            long_files.append(f"{p.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long_files and not long_functions, long_files + long_functions


def test_the_library_never_imports_the_studio_and_the_studio_never_imports_training():
    lib = [(p, m) for p in ROOT.glob("genevolve/**/*.py") for m, _ in _imports(p) if m == "studio" or m.startswith("studio.")]
    studio = [(p, m) for p in ROOT.glob("studio/**/*.py") for m, _ in _imports(p) if m.startswith("genevolve.training")]
    assert not lib and not studio, lib + studio


def test_no_private_name_is_imported_from_another_module():
    found = [f"{p.relative_to(ROOT)}: {m}.{n}" for p in ROOT.glob("genevolve/**/*.py") for m, names in _imports(p)
             for n in names if re.match(r"_[a-z]", n)]
    found += [f"{p.relative_to(ROOT)}: {m}.{n}" for p in ROOT.glob("studio/**/*.py") for m, names in _imports(p)
              for n in names if re.match(r"_[a-z]", n)]
    assert not found, found


LAYERS = ["records", "policies|generators|judges|tools|world", "agent", "experience", "training", "evaluation",
          "serving|cli"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "genevolve" or len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names.split("|")), None)


def test_layers_import_downwards_at_module_level():
    """Records, then backends (policies, generators, judges, tools, the sandbox world), the agent, experience,
    training, evaluation, then the surfaces: a module's top-level imports never reach a higher layer."""
    upward = []
    for p in ROOT.glob("genevolve/**/*.py"):
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        here = _layer(mod)
        if here is None:
            continue
        tree = ast.parse(p.read_text("utf-8"))
        pkg = mod.split(".")[:-1] if p.name != "__init__.py" else mod.split(".")[:-1]
        for node in tree.body:  # top level only: a lazy import inside a function is a deliberate late binding
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                there = _layer(target)
                if there is not None and there > here:
                    upward.append(f"{mod} -> {target}")
    assert not upward, upward


def test_every_import_of_the_project_names_a_module_that_exists():
    """In the library, the studio, benchmarks, scripts and tests; imports inside functions too (the lazy ones
    only fail when someone reaches them)."""
    import importlib.util

    missing = []
    for p in CODE:
        for mod, names in _imports(p):
            if not mod.startswith(("genevolve", "studio")):
                continue
            if importlib.util.find_spec(mod) is None:
                missing.append(f"{p.relative_to(ROOT)}: {mod}")
                continue
            for n in names:  # `from package import module` names a submodule or an attribute
                if n != "*" and not _defines(mod, n):
                    missing.append(f"{p.relative_to(ROOT)}: {mod}.{n}")
    assert not missing, missing


def _defines(module: str, name: str) -> bool:
    import importlib

    if hasattr(importlib.import_module(module), name):
        return True
    try:
        return importlib.util.find_spec(f"{module}.{name}") is not None
    except ModuleNotFoundError:
        return False
