"""Run the estimators across processes (torch.distributed): shards, exact merges, one verdict.

Every rank streams its own shard of the calibration data and keeps per-channel float64
``(count, mean, M2)`` sums, as in one process. At each merge point the ranks exchange those
sums (O(channels) per norm, once per pass, never per batch) and every rank merges all of them
*in rank order* with the same Chan update used across batches, from the same serialized
copies: the results are bit-identical on every rank and equal the one-process result up to
float64 rounding.

Every collective is one :meth:`Dist.exchange` of a tagged payload, so a rank that fails
(bad batch, exception in the model) can still answer the collective the others are in: it
sends its error, every rank raises that same error (:class:`RemoteError`, a
:class:`~varshift.errors.VarshiftError` whose message is the failing rank's line), and all
ranks meet once more in :meth:`Dist.finish`, which agrees on one exit code and message. The
process group's timeout bounds every wait.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..errors import RemoteError, VarshiftError

#: Seconds a collective may wait for the other ranks (env ``VARSHIFT_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 1800.0

_OK, _ERROR, _FINAL = "ok", "error", "final"

#: What this process sent in collectives so far (for benchmarks and tests): the number of
#: all-gathers and the bytes of this rank's pickled payloads.
TRAFFIC = {"collectives": 0, "bytes_sent": 0}


@dataclass
class Dist:
    """Where this process stands: its rank, the world size and the group to talk over.

    ``Dist()`` is the single-process case: every method is a no-op there.
    """

    rank: int = 0
    world: int = 1
    group: Any = None
    #: ``announced``: this rank's failure was sent; ``closed``: the last collective is over.
    announced: bool = field(default=False, repr=False)
    closed: bool = field(default=False, repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the one collective

    def _gather(self, tag: str, body: Any) -> list[tuple[str, Any]]:
        """One all-gather of ``(tag, body)``; every rank gets the same list, in rank order.

        A collective in which any rank is in :meth:`finish` is the last one for every rank
        (``closed``): that rank will not come back for another.
        """
        import pickle

        import torch.distributed as dist

        item = (tag, body)
        size = len(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        TRAFFIC["bytes_sent"] += size
        TRAFFIC["collectives"] += 1
        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, item, group=self.group)
        except Exception as exc:  # a rank died, or the timeout passed
            self.closed = True
            raise VarshiftError(
                f"rank {self.rank}: lost contact with the other ranks ({_first_line(exc)})"
            ) from exc
        if any(t == _FINAL for t, _ in gathered):
            self.closed = True
        return gathered

    @staticmethod
    def _failure(gathered: list[tuple[str, Any]]) -> tuple[int, int, str] | None:
        """The lowest rank's ``(rank, code, message)`` among those that failed; a collective
        that mixes finished and computing ranks without an error is a failure too."""
        for rank, (tag, body) in enumerate(gathered):
            if tag in (_ERROR, _FINAL) and body[1] is not None:
                return rank, body[0], body[1]
        tags = {t for t, _ in gathered}
        if _FINAL in tags and _OK in tags:
            rank = next(r for r, (t, _) in enumerate(gathered) if t == _FINAL)
            return rank, 2, (f"rank {rank} finished while other ranks were still computing "
                             "(the ranks ran different passes: give every rank the same model "
                             "and options)")
        return None

    def exchange(self, payload: Any) -> list[Any]:
        """Send ``payload`` to every rank and return all ranks' payloads in rank order.

        Raises:
            RemoteError: another rank failed (every rank raises the same one: the lowest
                failing rank's code and message).
        """
        if not self.active:
            return [payload]
        gathered = self._gather(_OK, payload)
        failure = self._failure(gathered)
        if failure is not None:
            rank, code, message = failure
            raise RemoteError(message, rank, code)
        return [body for _, body in gathered]

    def fail(self, message: str, code: int = 2) -> None:
        """Tell the other ranks this one failed, in whatever collective they are in: they
        raise :class:`RemoteError` with this message (or this rank meets their finish)."""
        if self.active and not self.closed:
            self._gather(_ERROR, (code, message))

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """On an exception in the body, tell the other ranks (once) before it propagates, so
        that they raise it too instead of waiting for this rank until the timeout."""
        try:
            yield
        except BaseException as exc:
            if self.active and not self.announced and not isinstance(exc, RemoteError):
                self.announced = True
                code, message = outcome(exc, self.rank)
                with contextlib.suppress(VarshiftError):
                    self.fail(message, code)
            raise

    def finish(self, code: int, message: str | None = None) -> tuple[int, str | None]:
        """Agree on the outcome; call once at the end, on every rank, also after an error.

        Returns the lowest failing rank's ``(code, message)`` on every rank, or, when none
        failed, the highest exit code (one rank's threshold fails them all) and None.
        """
        if not self.active:
            return code, message
        if self.closed:  # the last collective already included a finished rank
            return code, message
        try:
            gathered = self._gather(_FINAL, (code, message))
        except VarshiftError as exc:
            return 2, str(exc)
        failure = self._failure(gathered)
        if failure is not None:
            return failure[1], failure[2]
        return max(body[0] for _, body in gathered), None

    # ------------------------------------------------------------------ merges

    def merge_stats(self, stats: Any, n_batches: int = 0) -> int:
        """Merge a hook collector's ``moments`` across ranks, and its per-norm ``calls`` and
        first-call ``order`` when it keeps them, in one exchange; returns the total batch
        count. (One exchange, not one per kind: the exact estimator merges once per norm.)"""
        if not self.active:
            return n_batches
        calls = getattr(stats, "calls", {})
        order = getattr(stats, "order", None)
        everyone = self.exchange((self._packed(stats.moments), n_batches, calls, order))
        self._merge(stats.moments, [packed for packed, *_ in everyone])
        calls.update({n: sum(int(c.get(n, 0)) for _, _, c, _ in everyone) for n in calls})
        if order is not None:
            stats.order = list(dict.fromkeys(n for *_, o in everyone for n in o))
        return sum(int(n) for _, n, _, _ in everyone)

    @staticmethod
    def _packed(moments: dict[str, Any]) -> tuple[list[str], list[Any]]:
        names = sorted(moments)
        return names, [_pack(moments[n]) for n in names]

    @staticmethod
    def _merge(moments: dict[str, Any], everyone: list[Any]) -> None:
        from .stats import ChannelMoments

        names = sorted(moments)
        if any(their_names != names for their_names, _ in everyone):
            raise VarshiftError("the ranks measured different BatchNorm layers; run the same "
                                "model on every rank")
        for i, name in enumerate(names):
            merged = ChannelMoments()
            for _, packs in everyone:
                count, mean, m2 = packs[i]
                if count:
                    merged.merge(count, torch.from_numpy(mean), torch.from_numpy(m2))
            target = moments[name]
            device = target.mean.device if target.mean is not None else torch.device("cpu")
            target.count = merged.count
            target.mean = None if merged.mean is None else merged.mean.to(device)
            target.m2 = None if merged.m2 is None else merged.m2.to(device)

    def sum_counts(self, values: dict[Any, int]) -> dict[Any, int]:
        """Per-key sums of integer counters (calls, samples, batches) over all ranks."""
        if not self.active:
            return dict(values)
        everyone = self.exchange(dict(values))
        return {k: sum(int(d.get(k, 0)) for d in everyone) for k in values}



def outcome(exc: BaseException, rank: int = 0) -> tuple[int, str]:
    """The exit code and one-line message for ``exc`` (a remote one keeps its own)."""
    if isinstance(exc, RemoteError):
        return exc.code, str(exc)
    if isinstance(exc, VarshiftError):
        return 2, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, f"rank {rank} was interrupted"
    return 3, f"internal error on rank {rank} ({type(exc).__name__}: {_first_line(exc)})"


def _pack(m: Any) -> tuple[int, Any, Any]:
    if m.mean is None or not m.count:
        return 0, None, None
    return int(m.count), m.mean.detach().cpu().double().numpy(), m.m2.detach().cpu().double().numpy()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# --------------------------------------------------------------------------- groups


def unwrap(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def resolve(process_group: Any = None) -> Dist:
    """The :class:`Dist` for ``process_group``.

    ``None`` (the default) means torch's default group when one is initialized, else one
    process; ``False`` forces one process; a group object is used as given.
    """
    if process_group is False:
        return Dist()
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return Dist()
    if not (dist.is_available() and dist.is_initialized()):
        if process_group not in (None, False):
            raise VarshiftError("process_group was given but torch.distributed is not initialized")
        return Dist()
    group = None if process_group is None else process_group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    return Dist(rank=rank, world=world, group=group)


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise VarshiftError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc})") from exc
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise VarshiftError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def timeout_seconds() -> float:
    text = os.environ.get("VARSHIFT_DIST_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise VarshiftError(f"VARSHIFT_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def env_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    where = env_world()
    return 0 if where is None else where[0]


def join(device: torch.device, backend: str | None = None) -> tuple[Dist, torch.device]:
    """Under torchrun, start (once) the default process group and pick this rank's device.

    ``backend`` defaults to NCCL for CUDA and gloo otherwise. A CUDA device without an index
    becomes ``cuda:LOCAL_RANK``. Outside torchrun (``WORLD_SIZE`` unset or 1): ``Dist()``
    and ``device`` unchanged. The caller owns the group it gets: :func:`shutdown` ends it.

    Raises:
        VarshiftError: a bad backend, or the group could not start.
    """
    if backend is not None and backend not in BACKENDS:
        raise VarshiftError(f"`backend` {backend!r}: choose one of {', '.join(BACKENDS)}")
    where = env_world()
    if where is None:
        return Dist(), device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", where[2])
    return init_from_env(backend, device), device


def init_from_env(backend: str | None, device: torch.device) -> Dist:
    """Initialize the default process group from torchrun's environment (once)."""
    import torch.distributed as dist

    where = env_world()
    if where is None:
        return Dist()
    rank, world, local = where
    if not dist.is_available():
        raise VarshiftError("this torch build has no torch.distributed; run in one process")
    if not dist.is_initialized():
        chosen = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(
                backend=chosen, timeout=datetime.timedelta(seconds=timeout_seconds())
            )
        except Exception as exc:
            raise VarshiftError(
                f"cannot start the process group ({chosen}, rank {rank} of {world}): "
                f"{_first_line(exc)}"
            ) from exc
    return resolve(None)


def shutdown(d: Dist) -> None:
    """Destroy the process group that :func:`join` started for ``d`` (nothing for one
    process)."""
    if not d.active:
        return
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


# --------------------------------------------------------------------------- shards


def shard(batches: Iterable[Any], d: Dist) -> Iterator[Any]:
    """Batches ``rank, rank + world, ...`` of ``batches``: disjoint, covering, deterministic.

    Batches of other ranks are skipped without being kept (a lazy source still builds them).
    """
    for index, batch in enumerate(batches):
        if index % d.world == d.rank:
            yield batch


def shard_data(cal: Any, d: Dist) -> Any:
    """This rank's share of a :class:`~varshift.data.Calibration`.

    File data (and any source that does not shard itself) is split by batch index after
    ``max_batches`` and ``max_samples``: rank r takes batches r, r + N, ... A data callable that takes ``rank``
    and ``world_size`` is called with them (:meth:`~varshift.io.data.Calibration.for_rank`)
    and returns this rank's share; a share already taken passes through.

    Raises:
        DataError: fewer batches than ranks (a rank would have nothing to measure).
    """
    if not d.active or getattr(cal, "rank_aware", False):
        return cal
    own = cal.for_rank(d.rank, d.world)
    if own is not None:
        return own
    from ..errors import DataError
    from ..io.data import Calibration

    total = cal.n_batches
    if total is not None and cal.max_batches is not None:
        total = min(total, cal.max_batches)
    if total is not None and total < d.world:
        raise DataError(
            f"{cal.source} has {total} batch(es) for {d.world} ranks: every rank needs at "
            "least one; use a smaller `batch_size` or fewer processes"
        )
    # Shard what ``cal`` yields, after its own --max-batches / --max-samples cut: the budget
    # is the job's, not each rank's.
    return Calibration(
        cal.source,
        lambda: shard(iter(cal), d),
        n_batches=None if total is None else len(range(d.rank, total, d.world)),
    )


def sharding_note(cal: Any, d: Dist) -> str | None:
    """How the ranks split the data, for the report (None in one process)."""
    if not d.active:
        return None
    if getattr(cal, "rank_aware", False):
        return (f"{d.world} ranks; each rank's batches came from the data callable, called "
                "with its rank and world_size")
    return (f"{d.world} ranks; rank r measured batches r, r+{d.world}, ... of the data; "
            "statistics merged exactly across ranks")
