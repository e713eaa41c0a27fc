"""Reward names, as the control plane checks them at submit and the scorer resolves them: a
built-in (algo/rewards.py, plain Python), `model:/path` (a reward model), or `pkg.module:fn` from a
module the operator allows.

`not_callable` answers, at submit, whether `pkg.module:fn` names a callable, from the module's
source (parsed with `ast`, never executed in the control plane)."""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import inspect
from collections.abc import Iterator
from pathlib import Path

from stillroom.actors.algo.rewards import BUILTINS

BUILTIN_NAMES = tuple(BUILTINS)


def module_allowed(module: str, allowed: tuple[str, ...]) -> bool:
    """Whether `module` is one of the allowed modules or a submodule of one."""
    return any(module == a or module.startswith(a + ".") for a in allowed)


def reference_column(name: str, args: dict[str, str]) -> str | None:
    """The dataset column built-in reward `name` compares with (its `column` argument, or the
    function's default), or None when it compares with none (or is not a built-in)."""
    fn = BUILTINS.get(name)
    default = inspect.signature(fn).parameters.get("column") if fn else None
    return None if default is None else args.get("column", default.default)


def module_source(module: str) -> Path | None | bool:
    """The source file of `module` (a .py), found without importing it or its parent packages
    (importlib.util.find_spec on `a.b` would run `a/__init__.py` in the server): False when there
    is no such module, None when it exists but has no Python source to read (an extension, a
    namespace package)."""
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: found, not imported
        for i in range(1, len(parts)):
            if spec is None or not spec.submodule_search_locations:
                return False
            name = ".".join(parts[: i + 1])
            spec = importlib.machinery.PathFinder.find_spec(name, list(spec.submodule_search_locations))
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    origin = spec.origin if spec.has_location else None
    return Path(origin) if origin and origin.endswith(".py") and Path(origin).is_file() else None


def imported_problem(module: str, attr: str) -> str | None:
    """What is wrong with reward function `module:attr` as the scorer will load it (None: nothing
    that can be seen without running the module)."""
    source = module_source(module)
    if source is False:
        return f"module {module!r} does not import on the server"
    if source is None:
        return None  # no Python source to read (an extension module): the scorer checks it
    stat = source.stat()
    return _source_problem(str(source), stat.st_mtime_ns, stat.st_size, module, attr)


@functools.lru_cache(maxsize=256)
def _source_problem(path: str, mtime_ns: int, size: int, module: str, attr: str) -> str | None:
    """not_callable on a module's source, once per version of the file (its mtime and size)."""
    try:
        problem = not_callable(importlib.util.decode_source(Path(path).read_bytes()), attr)
    except (SyntaxError, ValueError, UnicodeDecodeError) as e:
        return f"module {module!r} does not parse: {e}"
    return None if problem is None else f"module {module!r}: {problem}"


def not_callable(source: str, attr: str) -> str | None:
    """Why top-level `attr` of a module with this source is certainly not a callable (None: it is,
    or it may be). Callable: a def, async def or class, or a name assigned a lambda. Not: a name
    bound only by `import x` (a module) or assigned literals, or not bound at all. A name from
    `from x import f`, or assigned any other expression, cannot be known without running the module:
    accepted here (the scorer checks it when it loads the function), as is every name of a module
    that may bind names at run time (`from x import *`, a module `__getattr__`, globals(), exec)."""
    tree = ast.parse(source)
    if any(isinstance(n, ast.Name) and n.id in DYNAMIC for n in ast.walk(tree)) or any(
        isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in tree.body
    ):
        return None
    kinds = [kind for stmt in _top_level(tree.body) for kind in _binds(stmt, attr)]
    if any(k in ("callable", "unknown") for k in kinds):
        return None
    if "module" in kinds:
        return f"{attr!r} is a module imported there, not a function"
    if kinds:
        return f"{attr!r} is assigned a value that is not a function"
    return f"the module has no top-level function {attr!r}"


# Names whose use lets a module bind attributes its source does not show.
DYNAMIC = {"globals", "vars", "exec", "setattr"}


def _top_level(body: list) -> Iterator[ast.AST]:
    """The module's statements, those in top-level if/try/with/for blocks included (not those in
    functions or classes)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for block in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(stmt, block, None)
            if isinstance(inner, list):
                yield from _top_level(inner)


def _binds(stmt: ast.AST, attr: str) -> list[str]:
    """How `stmt` binds `attr`: callable, module, value (not callable), unknown; [] if it does not."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return ["callable"] if stmt.name == attr else []
    if isinstance(stmt, ast.Import):
        return ["module" for a in stmt.names if (a.asname or a.name.partition(".")[0]) == attr]
    if isinstance(stmt, ast.ImportFrom):
        return ["unknown" for a in stmt.names if a.name == "*" or (a.asname or a.name) == attr]
    if isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        if any(_names(t, attr) for t in targets):
            plain = all(isinstance(t, ast.Name) for t in targets)
            return [_value_kind(stmt.value, plain and not isinstance(stmt, ast.AugAssign))]
        return []
    bound = []  # names bound by for targets, with ... as, except ... as
    if isinstance(stmt, ast.For | ast.AsyncFor):
        bound = [stmt.target]
    elif isinstance(stmt, ast.With | ast.AsyncWith):
        bound = [item.optional_vars for item in stmt.items if item.optional_vars is not None]
    elif isinstance(stmt, ast.ExceptHandler) and stmt.name == attr:
        return ["unknown"]
    return ["unknown"] if any(_names(t, attr) for t in bound) else []


def _names(target: ast.AST, attr: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == attr for n in ast.walk(target))


def _value_kind(value: ast.AST | None, plain: bool) -> str:
    """A lambda is callable; a literal (number, string, list, dict...) is not; anything else (a call,
    a name, an attribute, an unpacking, an annotation without a value) cannot be known statically."""
    if isinstance(value, ast.Lambda):
        return "callable"
    literal = (ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.JoinedStr, ast.ListComp, ast.DictComp)
    return "value" if plain and isinstance(value, literal) else "unknown"


# -- user reward functions, in the scorer's worker processes ------------------------------------
# Light on purpose: a worker process imports this module and the user's, nothing heavy.
_RESOLVED: dict[str, object] = {}


def load_imported(names: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    """A worker's initializer: import every `pkg.module:fn` once, before any call is timed."""
    import importlib

    for name in names:
        module, _, attr = name.partition(":")
        if not module_allowed(module, allowed):
            raise PermissionError(f"reward module {module!r} is not in the operator's allow-list")
        _RESOLVED[name] = getattr(importlib.import_module(module), attr)


def call_imported(name: str, prompts: list, completions: list, kwargs: dict) -> object:
    """One call of an imported reward function in a worker process (loaded by load_imported)."""
    return _RESOLVED[name](prompts, completions, **kwargs)
