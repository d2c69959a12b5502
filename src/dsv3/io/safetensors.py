"""A minimal safetensors reader that maps a file and hands out one tensor at a time.

safetensors' own loader keeps every page it touched resident until the file is closed, so a
single-file checkpoint costs twice its size in RSS while loading. Here each tensor is viewed
straight from the mapping, copied by the caller, and its pages are released with
madvise(MADV_DONTNEED). Offsets are validated against the file size up front, so a truncated
file is reported with the tensor it cuts through rather than as a bus error.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from dsv3.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_PAGE = mmap.PAGESIZE


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file through a private memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path.name}: file is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{self.path.name}: header length {n} does not fit in the file (truncated or not safetensors)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path.name}: header is not valid JSON (not a safetensors file?)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path.name}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize:
                raise CheckpointError(f"{self.path.name}: tensor {name!r} byte range does not match its shape {list(shape)}")
            if self.base + end > size:
                raise CheckpointError(f"{self.path.name}: file is truncated inside tensor {name!r}")
            self.entries[name] = (dtype, shape, self.base + start, self.base + end)
        self._fh = open(self.path, "rb")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        """A tensor viewing the mapping: copy it before calling `release(name)`."""
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - start, offset=start)
        return raw.view(dtype).view(shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor already copied elsewhere."""
        _, _, start, end = self.entries[name]
        lo, hi = (start // _PAGE) * _PAGE, ((end + _PAGE - 1) // _PAGE) * _PAGE
        if self._mm is not None and hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(self._mm)) - lo)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
