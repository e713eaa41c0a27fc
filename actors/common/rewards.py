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
