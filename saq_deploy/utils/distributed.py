"""One place for torch.distributed: who we are, how work is split, and the few collectives used.

Launch with ``torchrun --nproc-per-node N -m saq_deploy <command> ...`` (docs/design/distributed.md).
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them everything
here is a no-op for one process, so single-process code paths stay exactly what they were.

Rules the callers follow (and why):

- Work is split in units of the single-process run (a sampling batch, a trajectory batch, a slice
  of one optimizer step's batch), and seeds are drawn for all samples then sliced, so the rank count
  never changes which numbers are computed, only where.
- Only rank 0 writes files (checkpoints, artifacts, manifests); other ranks write only the shard
  files they own. Every output path must therefore be on a file system all ranks share.
- Every collective goes through :func:`_collective`, so a rank that died (or a peer that hung past
  ``SAQ_DEPLOY_DIST_TIMEOUT`` seconds) surfaces on the survivors as one :class:`DistributedError`,
  which the CLI prints as one ``error:`` line with a non-zero exit.

torch.distributed is imported inside the functions: ``import saq_deploy`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from saq_deploy.errors import ConfigError, SaqError

TIMEOUT_ENV = "SAQ_DEPLOY_DIST_TIMEOUT"
BACKEND_ENV = "SAQ_DEPLOY_DIST_BACKEND"
# long enough for one rank's slowest unit of work between two collectives (a trajectory batch of a
# large UNet), short enough that a hung peer does not hold the other GPUs for torch's 30 min default
DEFAULT_TIMEOUT_S = 600.0
T = TypeVar("T")


class DistributedError(SaqError):
    """The process group failed: another rank died, was killed, or timed out."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (torchrun sets it)") from None


def env_world() -> World:
    """Rank and world size as torchrun's environment gives them (no process group needed)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={size} are inconsistent")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def world() -> World:
    """This process's place in the run; joins the process group on first use under torchrun."""
    w = env_world()
    if not w.active:
        return w
    import torch.distributed as dist

    if not dist.is_initialized():
        _init(w)
    return w


def _init(w: World) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    backend = os.environ.get(BACKEND_ENV, "").strip()
    if not backend:
        # the calibration code computes on CPU tensors, which NCCL cannot reduce: with a GPU, CPU
        # tensors still go through gloo and CUDA tensors through NCCL (one group, two backends)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank % torch.cuda.device_count())
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except Exception as e:  # a bad MASTER_ADDR, a port in use, a peer that never came up
        raise DistributedError(f"rank {w.rank}/{w.size} could not join the process group "
                               f"({backend}): {_first_line(e)}") from e
    import atexit

    atexit.register(_shutdown)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - exiting anyway; a dead peer must not turn exit into a hang
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _collective(what: str, fn: Callable[[], T]) -> T:
    """Run one collective; turn a dead or hung peer into one DistributedError line."""
    w = env_world()
    try:
        return fn()
    except DistributedError:
        raise
    except (RuntimeError, OSError, ValueError) as e:  # gloo: "Connection closed by peer", timeouts
        raise DistributedError(
            f"rank {w.rank}/{w.size}: {what} failed, another rank died or stopped answering "
            f"(timeout {timeout_s():g} s, {TIMEOUT_ENV}): {_first_line(e)}; the last checkpoint is kept, "
            "re-run the same command to resume") from None


def shard_range(n: int, w: World | None = None) -> range:
    """The contiguous part of ``range(n)`` this rank owns (sizes differ by at most one; a rank may
    own nothing when n < world size). Contiguous, so gathered results concatenate in rank order."""
    w = w or env_world()
    return range(n * w.rank // w.size, n * (w.rank + 1) // w.size)


def barrier(what: str = "barrier") -> None:
    w = world()
    if w.active:
        import torch.distributed as dist

        _collective(what, dist.barrier)


def all_gather_objects(obj: Any, what: str = "gather") -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list for one process)."""
    w = world()
    if not w.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    _collective(what, lambda: dist.all_gather_object(out, obj))
    return out


def broadcast_object(obj: Any, what: str = "broadcast") -> Any:
    """Rank 0's ``obj`` on every rank."""
    w = world()
    if not w.active:
        return obj
    import torch.distributed as dist

    box = [obj if w.is_rank0 else None]
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def all_reduce_sum_(tensors: Sequence[Any], what: str = "all-reduce") -> None:
    """Sum float tensors over ranks in place, as one flat buffer (one collective per call)."""
    w = world()
    if not w.active or not tensors:
        return
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
                      for t in tensors])
    _collective(what, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_reduce_grads_(params: Sequence[Any], what: str = "gradient all-reduce") -> None:
    """Sum the gradients of ``params`` over ranks, so every rank steps its optimizer on the same
    global gradient and the replicas stay equal. A parameter no rank has a gradient for keeps
    ``grad = None`` (the optimizer then skips it, as one process would: a zero gradient would
    still advance Adam's moments); one only some ranks have counts as zeros on the others."""
    w = world()
    if not w.active or not params:
        return
    import torch

    has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params])
    all_reduce_sum_([has], what)
    grads = []
    for p, n in zip(params, has.tolist(), strict=True):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_sum_(grads, what)


def agree(error: BaseException | None, what: str) -> None:
    """Call on every rank after a unit of work: if any rank failed, every rank raises (instead of
    the healthy ones waiting for the failed one until the timeout)."""
    w = world()
    if not w.active:
        if error is not None:
            raise error
        return
    msgs = all_gather_objects(None if error is None else _first_line(error), what)
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        r, m = bad[0]
        raise DistributedError(f"rank {r}/{w.size} failed during {what}: {m}")
