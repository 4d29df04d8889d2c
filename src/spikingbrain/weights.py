"""Reading safetensors checkpoints one tensor at a time, every check done before anything loads.

A safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the data. ``SafetensorsFile``
parses and checks the whole header when it is opened (known dtypes, byte counts that match the
shapes, every tensor inside the file), so a truncated or corrupt file is refused with its name
and the first tensor that does not fit, before a single weight is loaded.

Tensors are read through a memory map of the file: ``read(name, dtype)`` copies one tensor out
(converting its dtype on the way) and then tells the kernel that this process no longer needs
those pages (``madvise(MADV_DONTNEED)``), so streaming a 15 GB checkpoint leaves only the copies
the model keeps resident, not the file. ``CheckpointFiles`` gathers a directory's weights: one
``model.safetensors``, or the shards listed by ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import torch

from spikingbrain.errors import SpikingBrainError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # the format's own limit
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_PAGE = mmap.PAGESIZE
CHUNK = 64 << 20  # bytes copied (and released) at a time


class SafetensorsFile:
    """One ``.safetensors`` file: its checked header, and tensors read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SpikingBrainError(f"{self.path}: {size} bytes, too short for a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise SpikingBrainError(
                        f"{self.path}: truncated or not a safetensors file (header of {n} bytes, file of {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise SpikingBrainError(f"cannot read {self.path}: {e}") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpikingBrainError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SpikingBrainError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._check(name, info, size)
        self._map: mmap.mmap | None = None
        self._file = None

    def _check(self, name, info, size):
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as e:
            bad = info.get("dtype") if isinstance(info, dict) else info
            raise SpikingBrainError(f"{self.path}: tensor {name!r} has an unsupported or missing entry ({e}; {bad!r})") from None
        except (TypeError, ValueError):
            raise SpikingBrainError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or end - begin != numel * _itemsize(dtype) or begin < 0:
            raise SpikingBrainError(f"{self.path}: tensor {name!r}: shape {list(shape)} does not match its "
                                    f"{end - begin} bytes")
        if self.data_start + end > size:
            raise SpikingBrainError(
                f"{self.path} is truncated: tensor {name!r} ends at byte {self.data_start + end} but the "
                f"file has {size} bytes (an interrupted download or copy?)"
            )
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self._file = open(self.path, "rb")
            # a private (copy-on-write) mapping: torch.frombuffer wants a writable buffer; nothing
            # ever writes to it, so no page is copied
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def read(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` as a new tensor owning its memory (in ``dtype`` if given), or copied
        into ``out`` (any dtype, same number of elements). Copied ``CHUNK`` bytes at a time, each
        chunk's pages released right after, so the file adds at most one chunk to the resident set."""
        src_dtype, shape, begin, end = self.entries[name]
        if out is None:
            out = torch.empty(shape, dtype=dtype or src_dtype)
        elif out.numel() != math.prod(shape):
            raise SpikingBrainError(f"{self.path}: tensor {name!r} has {math.prod(shape)} elements, not {out.numel()}")
        if end == begin:
            return out
        item = _itemsize(src_dtype)
        flat = out.view(-1)
        mm = self._mapped()
        step = max(item, CHUNK - CHUNK % item)
        for lo in range(0, end - begin, step):
            n = min(step, end - begin - lo)
            start = self.data_start + begin + lo
            if start % item:  # misaligned for the element type: through an aligned byte copy
                part = torch.frombuffer(bytearray(mm[start:start + n]), dtype=src_dtype)
            else:
                part = torch.frombuffer(mm, dtype=src_dtype, count=n // item, offset=start)
            flat[lo // item:(lo + n) // item].copy_(part)
            del part
            self._release(start, n)
        return out

    def _release(self, start: int, length: int) -> None:
        """Drop the pages of ``[start, start + length)`` from this process (they stay in the page
        cache, which is the kernel's to reclaim)."""
        if not length or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = start - start % _PAGE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, lo, start + length - lo)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views the map (a caller kept one): leave it to GC
                pass
            self._file.close()
            self._map = self._file = None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CheckpointFiles:
    """The weights of a model directory: ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``, all headers checked up front, one name space."""

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        self.directory = d
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        if (d / INDEX).is_file():
            try:
                index = json.loads((d / INDEX).read_text())
                weight_map = dict(index["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SpikingBrainError(f"{d / INDEX}: not a valid safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise SpikingBrainError(f"{d}: the index lists shard(s) that are not there: {', '.join(missing)}")
        elif (d / SINGLE).is_file():
            weight_map, shards = None, [SINGLE]
        else:
            found = sorted(p.name for p in d.glob("*.safetensors"))
            if len(found) == 1:
                weight_map, shards = None, found
            elif found:
                raise SpikingBrainError(f"{d}: {len(found)} .safetensors files but no {INDEX} to say how they fit together")
            else:
                other = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                hint = (f" (found {', '.join(other[:3])}: only safetensors weights are read; convert them with "
                        "safetensors.torch.save_file)") if other else ""
                raise SpikingBrainError(f"{d}: no model weights ({SINGLE} or {INDEX}){hint}")
        for shard in shards:
            f = SafetensorsFile(d / shard)
            self.files.append(f)
            for name in f.keys():
                if name in self.where:
                    raise SpikingBrainError(f"{d}: tensor {name!r} is stored twice ({self.where[name].path.name}, {shard})")
                self.where[name] = f
        if weight_map is not None:
            wrong = [n for n, s in weight_map.items() if n not in self.where or self.where[n].path.name != s]
            extra = [n for n in self.where if n not in weight_map]
            if wrong or extra:
                raise SpikingBrainError(
                    f"{d / INDEX} does not match the shards: "
                    + "; ".join(x for x in (f"not where it says: {wrong[:5]}" if wrong else "",
                                            f"not listed: {extra[:5]}" if extra else "") if x)
                )

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.where[name].dtype(name)

    def read(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.where[name].read(name, dtype, out)

    def nbytes(self) -> int:
        return sum(e[3] - e[2] for f in self.files for e in f.entries.values())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
