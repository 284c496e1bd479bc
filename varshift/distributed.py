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
import contextvars
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from .errors import VarshiftError

#: Seconds a collective may wait for the other ranks (env ``VARSHIFT_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 1800.0

_OK, _ERROR, _FINAL = "ok", "error", "final"


class RemoteError(VarshiftError):
    """Another rank failed; the message is that rank's own one-line error.

    Attributes:
        rank: the failing rank.
        code: the exit code that rank reported (2 for bad input).
    """

    def __init__(self, message: str, rank: int, code: int = 2) -> None:
        super().__init__(message)
        self.rank = rank
        self.code = code


@dataclass
class Dist:
    """Where this process stands: its rank, the world size and the group to talk over.

    ``Dist()`` is the single-process case: every method is a no-op there.
    """

    rank: int = 0
    world: int = 1
    group: Any = None
    bytes_sent: int = 0
    #: This rank's failure was already sent; ``closed``: in the others' final collective.
    announced: bool = field(default=False, repr=False)
    closed: bool = field(default=False, repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the one collective

    def exchange(self, payload: Any, tag: str = _OK) -> list[Any]:
        """Send ``payload`` to every rank and return all ranks' payloads in rank order.

        Raises:
            RemoteError: another rank sent an error instead (every rank raises the same one:
                the lowest failing rank's).
        """
        if not self.active:
            return [payload]
        import pickle

        import torch.distributed as dist

        self.bytes_sent += len(pickle.dumps((tag, payload), protocol=pickle.HIGHEST_PROTOCOL))
        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, (tag, payload), group=self.group)
        except Exception as exc:  # a rank died, or the timeout passed
            raise VarshiftError(
                f"rank {self.rank}: lost contact with the other ranks ({_first_line(exc)})"
            ) from exc
        for rank, (their_tag, body) in enumerate(gathered):
            if their_tag == _ERROR:
                message, code = body
                raise RemoteError(message, rank, code)
        return [body for _, body in gathered]

    def fail(self, message: str, code: int = 2) -> bool:
        """Tell the other ranks this one failed, in the collective they are in.

        Returns True when every other rank was already in :meth:`finish` (so that collective
        *was* the final one), False when the caller still has to call :meth:`finish`.
        """
        if not self.active:
            return True
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, (_ERROR, (message, code)), group=self.group)
        except Exception:
            return True  # nobody left to tell
        return all(tag == _FINAL for r, (tag, _) in enumerate(gathered) if r != self.rank)

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
                self.closed = self.fail(message, code)
            raise

    def finish(self, code: int, message: str | None = None) -> tuple[int, str | None]:
        """Agree on the outcome: every rank gets the lowest failing rank's (code, message),
        or the highest exit code when none failed (1 from one rank's threshold fails all)."""
        if not self.active or self.closed:
            return code, message
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, (_FINAL, (code, message)), group=self.group)
        except Exception as exc:
            return 2, f"rank {self.rank}: lost contact with the other ranks ({_first_line(exc)})"
        outcomes = [body for _, body in gathered]
        errors = [(c, m) for c, m in outcomes if m is not None]
        if errors:
            return errors[0]
        return max(c for c, _ in outcomes), None

    # ------------------------------------------------------------------ merges

    def merge_moments(self, moments: dict[str, Any]) -> None:
        """Replace each :class:`~varshift.stats.ChannelMoments` in ``moments`` (same names on
        every rank) by the merge over all ranks, in rank order, identical on every rank."""
        if not self.active:
            return
        from .stats import ChannelMoments

        names = sorted(moments)
        mine = [_pack(moments[n]) for n in names]
        everyone = self.exchange((names, mine))
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

    def merge_stats(self, stats: Any, n_batches: int = 0) -> int:
        """Merge a hook collector's ``moments`` across ranks, and its per-norm ``calls`` and
        first-call ``order`` when it keeps them; returns the total batch count."""
        if not self.active:
            return n_batches
        self.merge_moments(stats.moments)
        calls = getattr(stats, "calls", {})
        counts = self.sum_counts({("run", "batches"): n_batches,
                                  **{("calls", n): c for n, c in calls.items()}})
        calls.update({n: counts[("calls", n)] for n in calls})
        if hasattr(stats, "order"):
            orders = self.exchange(stats.order)
            stats.order = list(dict.fromkeys(n for order in orders for n in order))
        return counts[("run", "batches")]

    def sum_counts(self, values: dict[str, int]) -> dict[str, int]:
        """Per-key sums of integer counters (calls, samples, batches) over all ranks."""
        if not self.active:
            return dict(values)
        everyone = self.exchange(dict(values))
        return {k: sum(int(d.get(k, 0)) for d in everyone) for k in values}

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks, added in rank order (identical everywhere)."""
        if not self.active:
            return list(values)
        everyone = self.exchange([float(v) for v in values])
        out = [0.0] * len(values)
        for vals in everyone:
            out = [a + b for a, b in zip(out, vals)]
        return out


def outcome(exc: BaseException, rank: int = 0) -> tuple[int, str]:
    """The exit code and one-line message for ``exc`` (a remote one keeps its own)."""
    if isinstance(exc, RemoteError):
        return exc.code, str(exc)
    if isinstance(exc, VarshiftError):
        return 2, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, f"rank {rank} was interrupted"
    return 3, f"internal error on rank {rank} ({type(exc).__name__}: {_first_line(exc)})"


_CURRENT: contextvars.ContextVar[Dist] = contextvars.ContextVar("varshift_dist", default=Dist())


def current() -> Dist:
    """The :class:`Dist` the running estimator uses (one process unless set by :func:`using`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(d: Dist) -> Iterator[Dist]:
    """Make ``d`` the :func:`current` one in the body, and guard the body with it."""
    token = _CURRENT.set(d)
    try:
        with d.guard():
            yield d
    finally:
        _CURRENT.reset(token)


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


def init_from_env(backend: str | None, device_type: str) -> Dist:
    """Initialize the default process group from torchrun's environment (once).

    ``backend`` defaults to NCCL for CUDA and gloo otherwise. Returns one-process ``Dist()``
    when not launched by torchrun (``WORLD_SIZE`` unset or 1).
    """
    import torch.distributed as dist

    where = env_world()
    if where is None:
        return Dist()
    rank, world, local = where
    if not dist.is_available():
        raise VarshiftError("this torch build has no torch.distributed; run in one process")
    if not dist.is_initialized():
        chosen = backend or ("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(local)
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


def shutdown() -> None:
    """Destroy the default process group if this process created one."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
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


class Shard:
    """A re-iterable view of every ``world``-th batch of ``source`` (starting at ``rank``).

    Keeps ``source``'s ``n_batches``/``samples``/``source`` attributes, adjusted to the shard.
    """

    def __init__(self, source: Any, d: Dist) -> None:
        self.source_batches = source
        self.dist = d
        total = getattr(source, "n_batches", None)
        self.n_batches = None if total is None else len(range(d.rank, total, d.world))
        self.source = getattr(source, "source", None)

    def __iter__(self) -> Iterator[Any]:
        return shard(self.source_batches, self.dist)
