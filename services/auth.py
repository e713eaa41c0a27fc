"""Bearer tokens -> principals (tenant, may it write). Tokens are kept only as SHA-256 digests and
never logged.

Sources: a YAML/JSON file
    tokens:
      - {tenant: team-a, token: "..."}            # or token_sha256: "<hex>"
      - {tenant: team-a, token: "...", read_only: true}
and/or the environment: STILLROOM_TOKENS="team-a=tok1,team-b=tok2".
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from stillroom.services.errors import Unauthenticated


@dataclass(frozen=True)
class Principal:
    tenant: str
    read_only: bool = False


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    def __init__(self, principals: dict[str, Principal]):
        self._by_digest = dict(principals)

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, path: str | Path | None = None, env: str | None = None) -> TokenTable:
        table: dict[str, Principal] = {}
        if path:
            doc = yaml.safe_load(Path(path).read_text()) or {}
            for i, entry in enumerate(doc.get("tokens", [])):
                if not entry.get("tenant") or not (entry.get("token") or entry.get("token_sha256")):
                    raise ValueError(f"{path}: tokens[{i}] needs a tenant and a token or token_sha256")
                key = entry.get("token_sha256") or digest(str(entry["token"]))
                table[key] = Principal(str(entry["tenant"]), bool(entry.get("read_only", False)))
        env = os.environ.get("STILLROOM_TOKENS", "") if env is None else env
        for pair in filter(None, (p.strip() for p in env.split(","))):
            tenant, sep, token = pair.partition("=")
            if not sep or not tenant or not token:
                raise ValueError("STILLROOM_TOKENS must look like 'tenant=token,tenant2=token2'")
            table[digest(token)] = Principal(tenant)
        return cls(table)

    def authenticate(self, metadata: tuple | list | None) -> Principal:
        """The principal of an `authorization: Bearer <token>` header, or Unauthenticated."""
        header = next((v for k, v in metadata or () if k.lower() == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        principal = self._by_digest.get(digest(token.strip()))
        if principal is None:
            raise Unauthenticated("unknown or revoked token")
        return principal
