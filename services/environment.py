"""The server's own environment, cleaned before Ray starts: every process Ray starts from this one
(an embedded cluster's raylet, its workers, the supervisors and the actors that run tenants' reward
code) inherits it, and any tenant's code could read a secret left there."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# The API tokens of every tenant (the server's) and of one tenant (the client's).
SECRETS = ("STILLROOM_TOKENS", "STILLROOM_TOKEN")


def scrub_environment(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove the API tokens from `environ` (default: this process's); returns the names removed.
    Call it once the token table is loaded and before Ray is started or joined."""
    environ = os.environ if environ is None else environ
    removed = [name for name in SECRETS if name in environ]
    for name in removed:
        del environ[name]
    return removed
