"""The ranks of one step, on `torch.distributed`: who owns which files, and the few collectives.

Started under `torchrun` (or Slurm's `srun` with the same variables), pdt joins the process
group the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and every rank
runs the same step on its own share of the checkpoint files: the same records, the same
decisions, in the same order, so the collectives below are reached by every rank at the same
point. What crosses ranks is small (h x h factors, counts, hashes, yes/no): the values never
do. Outside a launcher (WORLD_SIZE unset or 1) `SINGLE` stands in and every collective is the
identity, so the one-process path is the same code.

A rank that fails or dies never reaches the next collective; the others then fail there
within the process group's timeout (at once when the dead rank's sockets close) with a
`DistributedError`, before any commit or publish, which are collectives too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DistributedError, UsageError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT = 600.0  # seconds a rank waits for the others at a collective
_RANK_WORDS = re.compile(r"([0-9]+)")


@dataclass
class World:
    """This process's place among the ranks of a step; `SINGLE` is the one-process world."""

    rank: int = 0
    size: int = 1
    group: Any = field(default=None, repr=False)  # a gloo group for the small CPU collectives
    _calls: int = field(default=0, repr=False)  # collectives so far: every rank must be at the same one

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: it writes what is shared (the index, `.metadata`) and publishes outputs."""
        return self.rank == 0

    def _collective(self, what: str, call):
        try:
            return call()
        except DistributedError:
            raise
        except RuntimeError as exc:  # gloo: a peer closed its connection, or the timeout passed
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(f"rank {self.rank}: another rank stopped before {what} ({reason[:160]}); "
                                   "its own error says why; nothing was committed or published") from exc

    def gather(self, obj: Any, what: str = "a collective") -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        self._calls += 1
        out: list[Any] = [None] * self.size
        self._collective(what, lambda: dist.all_gather_object(out, (self._calls, what, obj), group=self.group))
        left = [rank for rank, (_, at, _) in enumerate(out) if at == _LEFT]
        if left:  # a rank whose part failed inside a training loop, which goes on: it waits in `settle`
            raise DistributedError(f"rank {self.rank}: rank {left[0]} failed before {what}; its own error says why; "
                                   "nothing was committed or published")
        behind = [(rank, call, at) for rank, (call, at, _) in enumerate(out) if (call, at) != (self._calls, what)]
        if behind:  # a rank took another branch: stop here rather than pair unrelated collectives
            rank, call, at = behind[0]
            raise DistributedError(f"rank {self.rank}: the ranks are out of step (this rank at collective "
                                   f"{self._calls}, {what}; rank {rank} at {call}, {at}): do all nodes see the same "
                                   "folder? Nothing was committed or published")
        return [value for _, _, value in out]

    def sum(self, array: np.ndarray, what: str = "a collective") -> np.ndarray:
        """The element-wise sum of `array` over ranks (int64 or float64, exact for counts)."""
        if not self.active:
            return np.asarray(array)
        return np.sum(self.gather(np.asarray(array), what), axis=0)

    def agree(self, ok: bool = True, what: str = "a collective") -> None:
        """A barrier that also says whether every rank got here in good order; raises on all ranks
        when one did not (or is gone), so that no rank commits or publishes alone."""
        if not self.active:
            return
        flags = self.gather(bool(ok), what)
        if not all(flags):
            failed = [rank for rank, flag in enumerate(flags) if not flag]
            raise DistributedError(f"rank {self.rank}: rank(s) {failed} failed before {what}; its own error says "
                                   "why; nothing was committed or published")

    def same(self, value: Any, what: str) -> None:
        """Refuse to go on unless every rank has the same `value` (what it sees of the folder, its store)."""
        if not self.active:
            return
        values = self.gather(value, what)
        differ = [rank for rank, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedError(f"rank {differ[0]} sees other {what} than rank 0 (is the folder on a filesystem "
                                   "every node shares, and the same?)")

    def owned(self, files: list[str]) -> list[str]:
        """This rank's share of a checkpoint's weight files: file i of the natural order goes to rank
        i mod size, so a DCP folder saved by as many ranks as this step has maps `__r_*.distcp` to
        rank r, and any other count is spread evenly. A file-less checkpoint (one file) is rank 0's."""
        ordered = sorted(files, key=natural_key)
        return [name for index, name in enumerate(ordered) if index % self.size == self.rank]

    def settle(self, problem: Any) -> list[Any]:
        """Every rank's outcome of its part of a step (None: done; else why it failed), once every rank has one.

        For ranks that go on after a failed step (a training loop): a rank that failed may have left the others
        waiting at any collective of the step. Each gather here reaches those as a rank that left (`gather` then
        raises there), and is repeated until every rank is settling, so each rank makes as many collectives as
        the others and the group stays usable. Bounded by the group's timeout per gather; RuntimeError (as
        DistributedError) when a rank is gone."""
        if not self.active:
            return [problem]
        import torch.distributed as dist

        while True:
            out: list[Any] = [None] * self.size
            self._collective("settling the step", lambda out=out: dist.all_gather_object(
                out, (self._calls, _LEFT, problem), group=self.group))
            if all(at == _LEFT for _, at, _ in out):
                return [value for _, _, value in out]

    def digest(self, own: str) -> str:
        """One hash of a checkpoint from each rank's hash of its own share: the same on every rank."""
        if not self.active:
            return own
        return hashlib.sha256("\0".join(self.gather(own, "hashing the checkpoint")).encode()).hexdigest()


def natural_key(name: str) -> tuple:
    """`__2_0.distcp` before `__10_0.distcp`: numbers compare as numbers (ASCII digits only; a name
    has its numbers and its text at the same places, so every key compares with every other)."""
    return tuple((0, int(part), "") if part.isascii() and part.isdigit() else (1, 0, part)
                 for part in _RANK_WORDS.split(name))


SINGLE = World()
_LEFT = "(left the step)"  # what a settling rank is at: no collective of a step has this name
_CURRENT: ContextVar[World] = ContextVar("pdt_world", default=SINGLE)


def current() -> World:
    """The world of the step being run (`SINGLE` unless `joined` set one)."""
    return _CURRENT.get()


def launched_size() -> int:
    """WORLD_SIZE as a launcher (torchrun, srun with the torch variables) set it; 1 without one."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={text!r} is not a number of ranks") from None
    return max(1, size)


def _launched_for_pdt() -> bool:
    """Whether the launcher's variables are meant for this process: torchrun started it (its parent is
    torchrun), or PDT_DISTRIBUTED=1 says so (another launcher). A pdt that a training worker started
    inherits the worker's RANK and MASTER_PORT, and must not join the training's process group: it
    runs as one process, and says why."""
    flag = os.environ.get("PDT_DISTRIBUTED")
    if flag is not None:
        return flag.strip().lower() not in ("", "0", "no", "false", "off")
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        parent = ""
    if any(mark in parent for mark in ("torchrun", "torch.distributed.run", "torch/distributed/run")):
        return True
    log.warning("WORLD_SIZE=%s, but this pdt was not started by torchrun: it runs as one process "
                "(PDT_DISTRIBUTED=1 joins the process group of another launcher)", os.environ.get("WORLD_SIZE"))
    return False


def launched_rank() -> int:
    """RANK as a launcher set it (0 without one, or when it is not a number): who prints results."""
    text = os.environ.get("RANK", "0")
    return int(text) if text.isdigit() else 0


@contextlib.contextmanager
def joined(backend: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Iterator[World]:
    """The process group of a launched run for the duration of a command (SINGLE when there is none).

    The collectives pdt needs are a few kilobytes on the CPU, so they always go over a gloo group;
    `backend` is the group the launcher's job uses (auto: nccl when this rank has a GPU, else gloo).
    A group that this process did not make (pdt called from inside training) is used as it is.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if current().active:  # a step inside a training loop, in the world it made of the training's ranks (`within`)
        yield current()
        return
    if launched_size() == 1 or not _launched_for_pdt():
        yield SINGLE
        return
    import torch
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
        try:
            dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"cannot join the process group ({backend}): {str(exc).splitlines()[0][:200]}") \
                from exc
    world = World(dist.get_rank(), dist.get_world_size(), gloo_group(timeout) if dist.get_backend() != "gloo" else None)
    try:
        with within(world):
            yield world
    finally:
        if made:
            with contextlib.suppress(Exception):  # a group broken by a dead rank cannot be torn down cleanly
                dist.destroy_process_group()


def gloo_group(timeout: float) -> Any:
    """A gloo group of all the ranks of the process group this process joined, whose collectives wait at most
    `timeout` seconds. Every rank must make it at the same point (torch numbers groups by creation)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout))


@contextlib.contextmanager
def within(world: World) -> Iterator[World]:
    """`world` as the one of the steps run inside (`current`); a training loop's step makes its own of the
    training's ranks (`gloo_group`), and `joined` then uses it as it is."""
    token = _CURRENT.set(world)
    try:
        yield world
    finally:
        _CURRENT.reset(token)
