"""Dual-order calibration data on disk: safetensors shards plus a ``manifest.json``.

A folder written by :func:`saq_deploy.calibrate.trajectory.collect_trajectories`::

    manifest.json             settings, grid, shard list (file, records, sha256), package versions
    shard_00000.safetensors   records 0 .. shard_size-1
    shard_00001.safetensors   ...

Every shard holds the same fields, one row per record (one sample at one outer step):

===========  ============  =========================================================================
field        dtype         meaning
===========  ============  =========================================================================
x_outer      float32 (S)   first-order (outer grid) point x~_{t_{i-1}}
t_outer      float64       t_{i-1} (discrete scale; the model saw it as float32)
x_inter      float32 (S)   second-order intermediate point u_i (PLMS, DDIM: = x_outer)
t_inter      float64       s_i (PLMS, DDIM: = t_outer)
label        int64         class label (a text UNet: prompt index), -1 for an unconditional model
eps_outer    float32 (S)   FP (CFG-combined) eps at the outer point
eps_inter    float32 (S)   FP target direction: eps(u_i, s_i) / PLMS eps'_t / eps_outer
step         int64         outer step index i (0 = first step from x_T)
sample       int64         index of the sample (row of the seeded x_T)
===========  ============  =========================================================================

(S) is the sample shape. A text UNet's data also hold ``cond_table.safetensors``: the prompt
embedding rows (P [+ 1], L, D) that ``label`` indexes (hashed in the manifest's ``cond_table``). Reading streams shard by shard, so memory stays bounded by one shard plus
one batch whatever the data set size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from saq_deploy.errors import ConfigError, SaqError
from saq_deploy.utils.io import sha256_file

FORMAT = "saq-trajectories"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
COND_TABLE_FILE = "cond_table.safetensors"
PAIRINGS: tuple[str, ...] = ("outer_to_intermediate", "intermediate_to_outer")
RECORD_FIELDS: tuple[str, ...] = (
    "x_outer", "t_outer", "x_inter", "t_inter", "label", "eps_outer", "eps_inter", "step", "sample",
)
DEFAULT_FIELDS: tuple[str, ...] = ("x_outer", "t_outer", "label")


class StudentFields(NamedTuple):
    """Field names of the quantized (student) input; a tuple, so it can be passed as ``fields``."""

    x: str
    t: str
    cond: str


class TargetFields(NamedTuple):
    """Field names of the FP target: its input point (for block-level targets) and its eps."""

    x: str
    t: str
    cond: str
    eps: str


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def pairing_fields(pairing: str) -> tuple[StudentFields, TargetFields]:
    """Which stored fields are the student's input and the target for a pairing (docs/design/method.md §2.2).

    ``outer_to_intermediate`` (default, MOTA): quantized net at the outer point, FP target at the
    intermediate point. ``intermediate_to_outer``: the reverse reading, for the ablation.
    """
    if pairing == "outer_to_intermediate":
        return StudentFields("x_outer", "t_outer", "label"), TargetFields("x_inter", "t_inter", "label", "eps_inter")
    if pairing == "intermediate_to_outer":
        return StudentFields("x_inter", "t_inter", "label"), TargetFields("x_outer", "t_outer", "label", "eps_outer")
    raise ConfigError(f"unknown pairing {pairing!r}; valid: {', '.join(PAIRINGS)}")


class ShardWriter:
    """Buffers record chunks and writes fixed-size shards (the last one may be shorter)."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder = Path(folder)
        self.shard_size = int(shard_size)
        self.shards: list[dict[str, Any]] = []
        self._buf: list[dict[str, Tensor]] = []
        self._rows = 0

    def add(self, chunk: dict[str, Tensor]) -> None:
        self._buf.append(chunk)
        self._rows += int(next(iter(chunk.values())).shape[0])
        while self._rows >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> list[dict[str, Any]]:
        if self._rows:
            self._flush(self._rows)
        return self.shards

    def _flush(self, n: int) -> None:
        merged = {k: torch.cat([c[k] for c in self._buf]) for k in self._buf[0]}
        rest = self._rows - n
        # clone the remainder so the written shard's memory is released
        self._buf = [{k: v[n:].clone() for k, v in merged.items()}] if rest else []
        self._rows = rest
        path = self.folder / shard_name(len(self.shards))
        save_file({k: v[:n].contiguous() for k, v in merged.items()}, str(path), metadata={"format": FORMAT})
        self.shards.append({"file": path.name, "records": n, "sha256": sha256_file(path)})


def fragment_name(index: int, start: int) -> str:
    return f".frag_{index:05d}_{start:012d}.safetensors"


class RangeShardWriter:
    """One rank's part of a sharded collection: records ``[start, stop)`` of a stream of ``total``.

    Shard boundaries are those of the single-process stream (every ``shard_size`` records), so the
    shards that lie wholly inside the range are written under their final name, and the ends of a
    shard shared with a neighbouring rank as fragments that :func:`merge_fragments` (rank 0) joins:
    the data set comes out byte-identical to one :class:`ShardWriter` over the whole stream."""

    def __init__(self, folder: Path, shard_size: int, start: int, stop: int, total: int) -> None:
        self.folder, self.shard_size = Path(folder), int(shard_size)
        self.pos, self.stop, self.total = int(start), int(stop), int(total)
        self.pieces: list[dict[str, Any]] = []
        self._buf: list[dict[str, Tensor]] = []
        self._rows = 0

    def add(self, chunk: dict[str, Tensor]) -> None:
        self._buf.append(chunk)
        self._rows += int(next(iter(chunk.values())).shape[0])
        while self._rows and self._rows >= self._next_boundary() - self.pos:
            self._flush(self._next_boundary() - self.pos)

    def _next_boundary(self) -> int:
        return min((self.pos // self.shard_size + 1) * self.shard_size, self.stop)

    def close(self) -> list[dict[str, Any]]:
        if self._rows:
            self._flush(self._rows)
        if self.pos != self.stop:
            raise SaqError(f"sharded collection wrote records up to {self.pos}, expected {self.stop}")
        return self.pieces

    def _flush(self, n: int) -> None:
        merged = {k: torch.cat([c[k] for c in self._buf]) for k in self._buf[0]}
        rest = self._rows - n
        self._buf = [{k: v[n:].clone() for k, v in merged.items()}] if rest else []
        self._rows = rest
        k = self.pos // self.shard_size
        lo, hi = k * self.shard_size, min((k + 1) * self.shard_size, self.total)
        whole = self.pos == lo and self.pos + n == hi
        path = self.folder / (shard_name(k) if whole else fragment_name(k, self.pos))
        save_file({f: v[:n].contiguous() for f, v in merged.items()}, str(path), metadata={"format": FORMAT})
        self.pieces.append({"index": k, "file": path.name, "records": n, "start": self.pos,
                            "sha256": sha256_file(path) if whole else None})
        self.pos += n


def merge_fragments(folder: Path, pieces: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join every rank's fragments into whole shards; return the manifest's shard list (in order)."""
    folder = Path(folder)
    by_index: dict[int, list[dict[str, Any]]] = {}
    for p in pieces:
        by_index.setdefault(int(p["index"]), []).append(p)
    shards = []
    for k in sorted(by_index):
        parts = sorted(by_index[k], key=lambda p: p["start"])
        if len(parts) == 1 and parts[0]["sha256"] is not None:
            shards.append({"file": parts[0]["file"], "records": parts[0]["records"], "sha256": parts[0]["sha256"]})
            continue
        datas = []
        for p in parts:
            with safe_open(str(folder / p["file"]), framework="pt") as f:
                datas.append({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 - not a dict
        fields = [f for f in RECORD_FIELDS if f in datas[0]]  # ShardWriter's order, for identical bytes
        path = folder / shard_name(k)
        save_file({f: torch.cat([d[f] for d in datas]).contiguous() for f in fields}, str(path),
                  metadata={"format": FORMAT})
        for p in parts:
            (folder / p["file"]).unlink()
        shards.append({"file": path.name, "records": sum(int(p["records"]) for p in parts),
                       "sha256": sha256_file(path)})
    return shards


class TrajectoryDataset:
    """Read access to a trajectory folder: streamed batches, small subsets, integrity checks."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not self.path.is_dir():
            raise SaqError(f"no trajectory data set at {self.path}: the folder does not exist")
        if not manifest_path.is_file():
            raise SaqError(f"no trajectory data set at {self.path}: {MANIFEST_NAME} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SaqError(f"cannot read {manifest_path}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SaqError(f"{manifest_path} is not a {FORMAT} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise SaqError(f"{manifest_path} has format version {manifest.get('version')}, "
                           f"this saq-deploy reads version {FORMAT_VERSION}")
        self.manifest: dict[str, Any] = manifest
        self._shards: list[dict[str, Any]] = list(manifest["shards"])
        counts = torch.tensor([int(s["records"]) for s in self._shards], dtype=torch.long)
        self._ends = torch.cumsum(counts, 0)
        self._starts = self._ends - counts
        self._student, self._target = pairing_fields(manifest["pairing"])

    @classmethod
    def open(cls, path: str | Path) -> TrajectoryDataset:
        return cls(path)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._shards) else 0

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TrajectoryDataset({str(self.path)!r}, sampler={m['sampler']!r}, pairing={m['pairing']!r}, "
                f"records={len(self)}, shards={len(self._shards)})")

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def conditional(self) -> bool:
        """False for an unconditional model: ``label`` is then -1 and the model takes cond=None."""
        return self.manifest.get("num_classes") is not None

    def cond_table(self) -> Tensor | None:
        """The prompt embedding rows ``label`` indexes (text UNets), checked against the manifest."""
        entry = self.manifest.get("cond_table")
        if entry is None:
            return None
        path = self.path / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise SaqError(f"{path} is missing or does not match its manifest hash")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("table")

    def student_fields(self) -> StudentFields:
        """Student (quantized-net) input fields under this data set's pairing."""
        return self._student

    def target_fields(self) -> TargetFields:
        """FP target fields (input point and eps) under this data set's pairing."""
        return self._target

    # -- reading ------------------------------------------------------------------------------
    def _check_fields(self, fields: Sequence[str]) -> list[str]:
        if isinstance(fields, str):
            fields = (fields,)
        names = list(dict.fromkeys(fields))  # de-duplicate (student + target share "label")
        known = self.manifest.get("fields", {})
        bad = [f for f in names if f not in known]
        if bad or not names:
            raise ConfigError(f"unknown trajectory field(s) {bad}; valid: {', '.join(known)}")
        return names

    def _read_shard(self, k: int, fields: Sequence[str]) -> dict[str, Tensor]:
        entry = self._shards[k]
        path = self.path / entry["file"]
        if not path.is_file():
            raise SaqError(f"shard {entry['file']} is missing from {self.path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                data = {name: f.get_tensor(name) for name in fields}
        except (SafetensorError, OSError) as exc:
            raise SaqError(f"shard {entry['file']} cannot be read: {exc}") from None
        for name, value in data.items():
            if value.shape[0] != int(entry["records"]):
                raise SaqError(f"shard {entry['file']} has {value.shape[0]} records in {name}, "
                               f"its manifest says {entry['records']}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise SaqError(f"shard {entry['file']} contains NaN/inf in {name}")
        return data

    def iter_batches(
        self,
        batch_size: int,
        *,
        fields: Sequence[str] = DEFAULT_FIELDS,
        shuffle_seed: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield ``{field: (batch_size, ...) tensor}`` covering every record once.

        Streams shard by shard (a batch may straddle two shards). ``shuffle_seed``: permute the
        shard order and the records within each shard with a seeded generator (deterministic;
        cheaper than a global shuffle and memory-bounded). Only the last batch may be short,
        unless ``drop_last``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        names = self._check_fields(fields)
        gen = None if shuffle_seed is None else torch.Generator().manual_seed(int(shuffle_seed))
        order = range(len(self._shards)) if gen is None else torch.randperm(len(self._shards), generator=gen).tolist()
        carry: dict[str, Tensor] | None = None
        for k in order:
            data = self._read_shard(k, names)
            if gen is not None:
                perm = torch.randperm(int(self._shards[k]["records"]), generator=gen)
                data = {f: v[perm] for f, v in data.items()}
            if carry is not None:
                data = {f: torch.cat([carry[f], data[f]]) for f in names}
                carry = None
            rows = int(data[names[0]].shape[0])
            start = 0
            while rows - start >= batch_size:
                yield {f: v[start:start + batch_size] for f, v in data.items()}
                start += batch_size
            if start < rows:
                carry = {f: v[start:].clone() for f, v in data.items()}
        if carry is not None and not drop_last:
            yield carry

    def load_fields(
        self, fields: Sequence[str], indices: Sequence[int] | Tensor | None = None
    ) -> dict[str, Tensor]:
        """Load ``fields`` for the given global record indices (all records if None), in that order.

        Meant for small subsets (e.g. a stratified calibration batch); use :meth:`iter_batches` to
        go over everything.
        """
        names = self._check_fields(fields)
        n = len(self)
        idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ConfigError(f"record indices must lie in [0, {n - 1}]")
        if idx.numel() == 0:
            return {f: v[:0] for f, v in self._read_shard(0, names).items()}
        shard_of = torch.searchsorted(self._ends, idx, right=True)
        parts: dict[str, list[Tensor]] = {f: [] for f in names}
        positions: list[Tensor] = []
        for k in shard_of.unique().tolist():
            sel = (shard_of == k).nonzero().squeeze(1)
            data = self._read_shard(k, names)
            local = idx[sel] - self._starts[k]
            for f in names:
                parts[f].append(data[f][local])
            positions.append(sel)
        order = torch.argsort(torch.cat(positions))
        return {f: torch.cat(parts[f])[order] for f in names}

    def verify(self) -> None:
        """Re-hash every shard against the manifest; SaqError on the first mismatch."""
        for entry in self._shards:
            path = self.path / entry["file"]
            if not path.is_file():
                raise SaqError(f"shard {entry['file']} is missing from {self.path}")
            if sha256_file(path) != entry["sha256"]:
                raise SaqError(f"shard {entry['file']} does not match its manifest hash")
