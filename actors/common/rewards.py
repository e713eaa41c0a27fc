"""Reward names, as the control plane checks them at submit and the scorer resolves them: a
built-in (algo/rewards.py, plain Python), `model:/path` (a reward model), or `pkg.module:fn` from a
module the operator allows."""

from __future__ import annotations

import inspect

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
