"""Where a result comes from: the digest of the code that computed it (by syntax tree, so comments and
docstrings do not count) and the versions of the libraries it ran on. Studies name themselves by the
first (``src.search.identity``); checkpoints record both (``src.model.checkpoint``)."""
from __future__ import annotations

import ast
import hashlib
from importlib import metadata
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
PROJECT = "spatial-abundance-automl"


def _module_path(module: str, root: Path) -> Path | None:
    """The file of ``src.a.b``: ``a/b.py``, or ``a/b/__init__.py`` for a package (None: not in the tree)."""
    parts = module.split(".")[1:]
    for path in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


def _normalized(tree: ast.AST) -> str:
    """The syntax tree without docstrings (comments and layout are not in it anyway)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _imported(tree: ast.AST, root: Path) -> set[str]:
    """``src.*`` modules imported anywhere in a module (also inside functions); ``from src.pkg import
    name`` counts ``src.pkg.name`` when that is a module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module == "src" or node.module.startswith("src.")):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if _module_path(f"{node.module}.{alias.name}", root) is not None}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("src.")}
    return found


def imported_modules(roots: tuple[str, ...], root: Path = SRC, exclude: set[str] = frozenset()) -> dict[str, str]:
    """Module name -> normalized syntax tree of ``roots`` and every ``src`` module they import, directly
    or not (``exclude`` and what only they import left out)."""
    todo, seen = list(roots), {}
    while todo:
        module = todo.pop()
        if module in seen or module in exclude:
            continue
        path = _module_path(module, root)
        if path is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        seen[module] = _normalized(tree)
        todo.extend(sorted(_imported(tree, root)))
    return seen


def modules_digest(modules: dict[str, str]) -> str:
    """16 hex digits that change when the code of any of ``modules`` does (not its comments or docstrings)."""
    h = hashlib.sha1()
    for module, tree in sorted(modules.items()):
        h.update(module.encode() + b"\0" + tree.encode() + b"\0")
    return h.hexdigest()[:16]




def versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each distribution ("not installed" where it is not)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
