"""A GGUF file's model sizes, read from its header without torch and without the `gguf` package's
reader (which parses every token string into objects: seconds for a 49k vocabulary, on every new
file). Reads the key/value section and the tensor names, never the tensors; returns the sizes
under the names a transformers config.json gives them.

GGUF (v2, v3): magic "GGUF", u32 version, u64 tensor count, u64 key/value count; each key a
string (u64 length, bytes), a u32 value type and the value; an array is a u32 element type, a u64
count and the elements. Then per tensor: its name, u32 dims, u64 per dim, u32 type, u64 offset.
The file may be a tenant's: every count is capped, every read bounds-checked (struct.error).
"""

from __future__ import annotations

import mmap
import struct

from stillroom.actors.common import paths

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MAX_KEYS, MAX_TENSORS, MAX_ITEMS = 10_000, 1_000_000, 2_000_000
# GGUF metadata -> config.json keys (llama.cpp's names, after "<architecture>.").
KEYS = {
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}


class _Reader:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.at = buf, 0

    def scalar(self, kind: int):
        fmt = "<" + SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar(10)
        if self.at + n > len(self.buf):
            raise struct.error("string past the end of the file")
        self.at += n
        return bytes(self.buf[self.at - n : self.at]).decode("utf-8", "replace")

    def value(self, kind: int, depth: int = 0):
        """A value; an array's elements are skipped, its length returned as ("array", n)."""
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            return self.scalar(kind)
        item, n = self.scalar(4), self.scalar(10)
        if n > MAX_ITEMS or depth > 1 or (item not in SCALARS and item not in (STRING, ARRAY)):
            raise ValueError("array too long, too deep or of an unknown type")
        if item in SCALARS:
            self.at += n * struct.calcsize(SCALARS[item])
        else:
            for _ in range(n):
                self.value(item, depth + 1)
        return ("array", n)


def read_config(path: str) -> dict | None:
    """The model sizes of a GGUF file as config.json keys, with `_gguf: True` (the header holds
    no other config field) and tie_word_embeddings (no separate output.weight). None when the
    file is not a GGUF this reader knows. Raises OSError when it cannot be opened."""
    with paths.open_regular(path) as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Reader(buf))
        except (struct.error, ValueError, KeyError):  # (mmap of an empty file: ValueError)
            return None


def _parse(r: _Reader) -> dict | None:
    if bytes(r.buf[:4]) != b"GGUF":
        return None
    r.at = 4
    if r.scalar(4) not in (2, 3):
        return None
    tensors, keys = r.scalar(10), r.scalar(10)
    if tensors > MAX_TENSORS or keys > MAX_KEYS:
        return None
    meta = {}
    for _ in range(keys):
        key = r.string()
        meta[key] = r.value(r.scalar(4))
    names = set()
    for _ in range(tensors):
        names.add(r.string())
        dims = r.scalar(4)
        r.at += 8 * dims + 4 + 8  # the dims, the type, the offset
    arch = meta.get("general.architecture", "")
    config = {"_gguf": True, "tie_word_embeddings": "output.weight" not in names}
    for key, name in KEYS.items():
        if isinstance(meta.get(f"{arch}.{key}"), int):
            config[name] = meta[f"{arch}.{key}"]
    tokens = meta.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and isinstance(tokens, tuple):
        config["vocab_size"] = tokens[1]
    return config
