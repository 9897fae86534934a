"""Reading and writing ``.safetensors`` files with numpy alone, lazily.

The format is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}}``) and the raw little-endian
tensor bytes. Reading maps the file (``np.memmap``) and hands out views, so a
process that needs a slice of a tensor (its shard) reads only those pages: no
host ever holds a full copy of a checkpoint larger than its memory. Nothing is
ever unpickled; PyTorch ``.bin``/``.pt`` files are refused by the caller.

Sharded checkpoints (``model.safetensors.index.json`` with a ``weight_map``) read
the same way as a single file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from jaxllm.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# A header larger than this is not a safetensors file (the format caps it at 100 MB).
_MAX_HEADER = 100 * 2**20


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"'{path}' is not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER or size > os.path.getsize(path) - 8:
            raise UserError(f"'{path}' is not a safetensors file (bad header length {size})")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"'{path}' is not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Every tensor of a checkpoint folder (one file or an index of shards), mapped.

    Args:
      folder: A Hugging Face checkpoint folder.

    Raises:
      UserError: If the folder holds no safetensors weights (pickled ``.bin``/``.pt``
        weights are named: they are never loaded).
    """

    def __init__(self, folder: str):
        self.folder = folder
        files = self._weight_files(folder)
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for path in files:
            header, start = _read_header(path)
            for name, entry in header.items():
                self._entries[name] = (path, entry, start)
        self._maps: dict[str, np.memmap] = {}

    @staticmethod
    def _weight_files(folder: str) -> list[str]:
        index = os.path.join(folder, INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        single = os.path.join(folder, SINGLE)
        if os.path.isfile(single):
            return [single]
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        found = [n for n in names if n.endswith(".safetensors")]
        if len(found) == 1:
            return [os.path.join(folder, found[0])]
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickled:
            raise UserError(
                f"'{folder}' holds pickled PyTorch weights ({', '.join(pickled[:3])}), which "
                "jaxllm never loads (unpickling runs code); save them as safetensors first: "
                "model.save_pretrained(dir, safe_serialization=True)"
            )
        raise UserError(
            f"'{folder}' has no {SINGLE} or {INDEX}; give a Hugging Face checkpoint folder"
        )

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def view(self, name: str) -> np.ndarray:
        """A read-only array view of tensor `name`; its bytes are read when indexed."""
        if name not in self._entries:
            raise UserError(f"'{self.folder}' has no tensor '{name}'; is it the right model?")
        path, entry, start = self._entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UserError(f"tensor '{name}' has dtype {entry['dtype']}, which jaxllm cannot read")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        flat = self._maps[path][start + begin : start + end]
        return flat.view(dtype).reshape(entry["shape"])  # little-endian hosts only


def write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray] | Iterator, metadata: dict | None = None
) -> None:
    """Writes `tensors` (name -> array) to `path` (atomically: a temp file, then rename).

    Args:
      path: The ``.safetensors`` file to write.
      tensors: Name -> numpy array, in the order they should be stored.
      metadata: Optional string -> string ``__metadata__`` (e.g. ``{"format": "pt"}``).
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in items:
        arr = np.asarray(arr)
        size = arr.size * arr.dtype.itemsize
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data start is 8-byte aligned, as the reference writer
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in items:
            f.write(np.ascontiguousarray(np.asarray(arr), dtype=np.asarray(arr).dtype).tobytes())
    os.replace(tmp, path)
