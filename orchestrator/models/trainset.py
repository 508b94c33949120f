"""A training set for label-free distillation of a brought model, read lazily (`--train PATH`).

The fp32 model is the teacher: its outputs on these inputs are the targets, so the set needs
no labels, and it may be far larger than the small `--inputs` samples (calibration and held-out
quality). Nothing of it is read into memory up front: every array is a read-only memory map and a
batch reads only its own rows. PATH is either

- a folder of `.npy` files, one per model input (`input_ids.npy`, `attention_mask.npy`, ...), each
  opened with `np.load(mmap_mode="r")`; or
- an **uncompressed** `.npz` (`np.savez`, not `np.savez_compressed`): `np.load` of an `.npz` reads
  a member whole, so each member is instead mapped in place, at its offset inside the zip file.
  A compressed member cannot be mapped and is refused with one line saying so.

Every array has the same number of rows along axis 0. Arrays not named like a model input
(`labels`, say) are ignored.

`augment` makes image-like inputs (float, 4-D N,C,H,W) a little different on every pass, the same
for the same seed: a random shift of up to 1/16 of the height and width (edges repeated) and a
brightness offset of up to 5% of the batch's spread. No flips: a mirrored crop of text or a
left/right-sensitive scene is another input, not the same one seen differently.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import ModelSourceError


class TrainSet:
    """{input name: read-only memory-mapped array} with the same rows along axis 0."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(Path(path).resolve())
        p = Path(self.path)
        if p.is_dir():
            self.how = "folder of .npy files, memory-mapped"
            files = sorted(p.glob("*.npy"))
            if not files:
                raise ModelSourceError(f"--train {self.path}: a folder without .npy files")
            self.arrays = {f.stem: _npy(f) for f in files}
        elif p.is_file():
            self.how = "uncompressed .npz, each member memory-mapped in place"
            self.arrays = _npz_members(p)
        else:
            raise ModelSourceError(f"--train {self.path}: no such file or folder")
        rows = {len(a) if a.ndim else -1 for a in self.arrays.values()}
        if len(rows) != 1 or -1 in rows:
            raise ModelSourceError(f"--train {self.path}: every array needs the same number of rows along axis 0 "
                                   f"(got {', '.join(f'{k} {a.shape}' for k, a in self.arrays.items())})")
        self.rows = rows.pop()
        if self.rows == 0:
            raise ModelSourceError(f"--train {self.path}: holds 0 rows")

    def __len__(self) -> int:
        return self.rows

    def describe(self, time_budget_s: float | None) -> dict[str, Any]:
        """What results.json says of the training set."""
        return {"path": self.path, "rows": self.rows, "read": self.how, "time_budget_s": time_budget_s}

    def key(self, time_budget_s: float | None) -> str:
        """Its part of the model's cache key: path, size and modification time (a large set is not read for it)."""
        p = Path(self.path)
        stats = [f.stat() for f in sorted(p.glob("*.npy"))] if p.is_dir() else [p.stat()]
        files = ",".join(f"{st.st_size}@{st.st_mtime_ns}" for st in stats)
        return f"train={self.path}:{files}:{self.rows}:{time_budget_s}"

    def refuse_overlap(self, held_out: dict[str, np.ndarray], names: list[str]) -> None:
        """ModelSourceError, in one line, when the set holds any held-out row byte for byte (quality would be
        measured on rows training saw). Checked once per process: it reads the whole set."""
        if getattr(self, "_separate", False):
            return
        shared = self.overlap({n: held_out[n] for n in names})
        if shared:
            raise ModelSourceError(f"--train {self.path}: holds {shared} of the {len(held_out[names[0]])} held-out "
                                   "rows of --inputs byte for byte; quality is measured on rows no training saw: take "
                                   "them out of the training set")
        self._separate = True

    def check_inputs(self, specs: Any) -> None:
        """Refuse, in one line, a set without an array for every model input or with a wrong dtype/shape."""
        for spec in specs:
            array = self.arrays.get(spec.name)
            if array is None:
                raise ModelSourceError(f"--train {self.path}: no array for input {spec.name} "
                                       f"(it has {', '.join(self.arrays)})")
            if str(array.dtype) != spec.dtype:
                raise ModelSourceError(f"--train {self.path}: {spec.name} is {array.dtype}, the model wants {spec.dtype}")
            if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != got
                                                    for d, got in zip(spec.shape[1:], array.shape[1:])):
                raise ModelSourceError(f"--train {self.path}: {spec.name} has shape {tuple(array.shape)}, the model "
                                       f"wants ({', '.join(map(str, spec.shape))})")

    def batch(self, index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """The rows `index` of each named input, read now (in index order; reads only those rows)."""
        order = np.argsort(index)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return {n: np.ascontiguousarray(self.arrays[n][index[order]])[back] for n in names}

    def overlap(self, held_out: dict[str, np.ndarray], chunk: int = 4096) -> int:
        """How many of the held-out rows are also in this set, byte for byte (all inputs of a row alike).

        Reads the whole set once, in chunks of `chunk` rows (a sequential pass over the files)."""
        names = sorted(held_out)
        if any(n not in self.arrays for n in names):
            return 0

        def keys(arrays: dict[str, np.ndarray], n: int) -> list[bytes]:
            flat = [np.ascontiguousarray(arrays[k]).reshape(n, -1).view(np.uint8) for k in names]
            return [b"".join(f[i].tobytes() for f in flat) for i in range(n)]

        n_held = len(held_out[names[0]])
        wanted = set(keys(held_out, n_held))
        found: set[bytes] = set()
        for start in range(0, self.rows, chunk):
            part = {k: self.arrays[k][start:start + chunk] for k in names}
            found.update(k for k in keys(part, len(part[names[0]])) if k in wanted)
        return len(found)


def augment(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Image-like inputs (float, N,C,H,W) shifted by up to 1/16 of their size and brightened or darkened a
    little, row by row; any other input as it is. Deterministic for a given `rng` state."""
    out = {}
    for name, x in batch.items():
        if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
            out[name] = x
            continue
        n, _, h, w = x.shape
        mh, mw = max(h // 16, 1), max(w // 16, 1)
        padded = np.pad(x, ((0, 0), (0, 0), (mh, mh), (mw, mw)), mode="edge")
        dy = rng.integers(0, 2 * mh + 1, size=n)
        dx = rng.integers(0, 2 * mw + 1, size=n)
        shifted = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        spread = float(x.std()) or 1.0
        offset = rng.uniform(-0.05, 0.05, size=(n, 1, 1, 1)) * spread
        out[name] = (shifted + offset).astype(x.dtype)
    return out


def _npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - one line
        raise ModelSourceError(f"--train {path}: not a readable .npy ({type(exc).__name__}: {exc})") from None


def _npz_members(path: Path) -> dict[str, np.ndarray]:
    """Each member of an uncompressed .npz as a read-only memory map at its place in the file."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelSourceError(f"--train {path}: not an .npz or a folder of .npy files ({exc})") from None
    arrays = {}
    with archive, open(path, "rb") as f:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            if info.compress_type != zipfile.ZIP_STORED:
                raise ModelSourceError(f"--train {path}: member {name!r} is compressed (np.savez_compressed); a "
                                       "training set is read lazily, so save it with np.savez or as a folder of .npy files")
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ModelSourceError(f"--train {path}: member {name!r} holds Python objects, not numbers")
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                     order="F" if fortran else "C")
    if not arrays:
        raise ModelSourceError(f"--train {path}: holds no .npy array")
    return arrays
