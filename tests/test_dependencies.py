"""Every module the code imports is declared (issue 16): a fresh venv must be enough.

The check parses the source with ``ast`` (nothing is imported, so a missing module cannot
hide behind an import error of its own). A top-level module name is allowed when it is

- in the standard library (``sys.stdlib_module_names``), or the project's own packages;
- a runtime dependency in pyproject's ``[project] dependencies`` (environment markers such
  as ``tomli; python_version < "3.11"`` count: the import sits behind the same condition);
- for the package: an optional extra's module only where the import is *guarded*, inside a
  ``try`` whose handler catches ``ImportError`` (so a user without the extra gets our own
  error naming it), or under ``if TYPE_CHECKING:``;
- for the tests: a runtime dependency, a module of the ``test`` extra, or the tests' and
  benchmarks' own modules.

Distribution names map to import names through the installed metadata when the
distribution is installed (``importlib.metadata.packages_distributions``), else by the
normalized name, so an undeclared module fails whether or not it happens to be installed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
OWN_PACKAGES = {"dtensor_parallel", "triton_kernels"}
PACKAGE_DIRS = [REPO / name for name in sorted(OWN_PACKAGES)]


def _dist_name(requirement: str) -> str:
    """'torch>=2.11' -> 'torch'; 'tomli>=1.1; python_version < "3.11"' -> 'tomli'."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert name, f"cannot read a distribution name from the requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def _modules_of(dists: set[str]) -> set[str]:
    """The top-level import names the distributions provide."""
    installed: dict[str, set[str]] = {}
    for module, owners in importlib.metadata.packages_distributions().items():
        for owner in owners:
            installed.setdefault(_dist_name(owner), set()).add(module)
    modules = set()
    for dist in dists:
        modules |= installed.get(dist, set()) | {dist.replace("-", "_")}
    return modules


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    if handler.type is None:
        return True
    for node in ast.walk(handler.type):
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
    return bool({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names))


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded) for every absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for stmt in node.body:
                guarded_lines |= {n.lineno for n in ast.walk(stmt) if hasattr(n, "lineno")}
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                guarded_lines |= {n.lineno for n in ast.walk(stmt) if hasattr(n, "lineno")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno, node.lineno in guarded_lines)
                      for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, node.lineno in guarded_lines))
    return found


def _undeclared(files: list[Path], allowed: set[str], allowed_if_guarded: set[str]) -> list[str]:
    bad = []
    for path in files:
        for module, line, guarded in imports_of(path):
            if module in sys.stdlib_module_names or module in allowed:
                continue
            if guarded and module in allowed_if_guarded:
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            hint = ("an optional extra's module must be imported inside try/except ImportError"
                    if module in allowed_if_guarded else "declare it in pyproject.toml or remove the import")
            bad.append(f"{where}: imports {module!r}, which is not declared ({hint})")
    return bad


def test_package_imports_only_declared_modules():
    project = _pyproject()
    runtime = _modules_of({_dist_name(r) for r in project["dependencies"]})
    extras = _modules_of({_dist_name(r) for reqs in project.get("optional-dependencies", {}).values()
                          for r in reqs})
    files = sorted(p for d in PACKAGE_DIRS for p in d.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} source files under {PACKAGE_DIRS}"
    bad = _undeclared(files, runtime | OWN_PACKAGES, extras)
    assert not bad, "\n".join(bad)


def test_tests_import_only_declared_modules():
    project = _pyproject()
    runtime = _modules_of({_dist_name(r) for r in project["dependencies"]})
    test_extra = _modules_of({_dist_name(r) for r in project["optional-dependencies"]["test"]})
    local = {p.stem for d in ("tests", "benchmarks") for p in (REPO / d).glob("*.py")}
    files = sorted((REPO / "tests").rglob("*.py"))
    bad = _undeclared(files, runtime | test_extra | OWN_PACKAGES | local, set())
    assert not bad, "\n".join(bad)


def test_numpy_is_not_needed():
    """The package reads token files with torch alone: numpy is neither imported nor declared."""
    project = _pyproject()
    assert "numpy" not in {_dist_name(r) for r in project["dependencies"]}


@pytest.mark.parametrize("source, module, reported", [
    ("import numpy as np\n", "numpy", True),
    ("from safetensors.torch import load_file\n", "safetensors", False),
    ("import os.path\nfrom torch.distributed import tensor\n", "torch", False),
    ("try:\n    import transformers\nexcept ImportError as e:\n    raise ValueError('pip install transformers') from e\n",
     "transformers", False),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from transformers import PreTrainedModel\n",
     "transformers", False),
    ("def f():\n    import transformers\n", "transformers", True),  # lazy but unguarded
    ("try:\n    import transformers\nexcept KeyError:\n    pass\n", "transformers", True),
])
def test_the_checker_sees_imports_and_guards(tmp_path, monkeypatch, source, module, reported):
    """The checker itself can fail: plain, from- and lazy imports are seen, guards told apart."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    f = tmp_path / "m.py"
    f.write_text(source)
    assert module in [m for m, _, _ in imports_of(f)]
    bad = _undeclared([f], {"torch", "safetensors"}, {"transformers"})
    assert bool(bad) == reported, bad


def test_undeclared_import_is_reported_with_module_and_file(tmp_path, monkeypatch):
    f = tmp_path / "uses_numpy.py"
    f.write_text("import os\nimport numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (msg,) = _undeclared([f], {"torch"}, set())
    assert msg.startswith("uses_numpy.py:2: imports 'numpy'")


def test_requires_python_is_true():
    """pyproject's requires-python admits only versions whose standard library the code finds:
    tomllib is 3.11+, so 3.10 needs the tomli fallback declared for it."""
    project = _pyproject()
    lowest = re.match(r">=\s*3\.(\d+)", project["requires-python"])
    assert lowest, project["requires-python"]
    if int(lowest.group(1)) < 11:
        tomli = [r for r in project["dependencies"] if _dist_name(r) == "tomli"]
        assert tomli and "python_version" in tomli[0], (
            "requires-python admits 3.10 but tomli is not declared for it: "
            "add 'tomli>=1.1; python_version < \"3.11\"' to [project] dependencies")
