"""Which stage kinds this build can run, and the function that runs each.

The control plane reads AVAILABLE (to refuse a job at submit, not hours later); the supervisor calls
runner(kind). Imports of the stage modules are deferred: they pull in torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# kind (the JobSpec Stage oneof field) -> "module:function"
_RUNNERS = {
    "audit": "actors.audit:run",
    "sft": "actors.sft:run",
    "grpo": "actors.grpo:run",
    "distill": "actors.distill:run",
    "evaluate": "actors.evaluate:run",
    "export": "actors.export:run",
}
AVAILABLE = tuple(_RUNNERS)


def runner(kind: str) -> Callable:
    module, fn = _RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), fn)
