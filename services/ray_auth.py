"""Ray token authentication for processes that join a cluster by address. Imports no ray: it
must run before ray is imported, because Ray reads RAY_AUTH_MODE at import time."""

from __future__ import annotations

import os
from pathlib import Path


def ray_token_available() -> bool:
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or token_file.exists()


def enable_ray_token_auth() -> None:
    """Keep Ray's token auth on: a process that names a cluster by address sends its token only when
    RAY_AUTH_MODE=token (Ray enables it by itself only for clusters it finds as "auto")."""
    if "RAY_AUTH_MODE" not in os.environ and ray_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
