"""A Lightning callback that recalibrates BatchNorm statistics with dropout off after fitting.

Optional: ``pip install 'varshift[lightning]'``. ::

    from varshift.lightning import RecalibrateBatchNorm

    trainer = lightning.Trainer(callbacks=[
        StochasticWeightAveraging(swa_lrs=1e-2),          # optional
        RecalibrateBatchNorm(calib_loader, exact=False),  # runs after everything else
    ])
    trainer.fit(model, train_loader)

At the end of fitting (``on_fit_end``: after every callback's ``on_train_end``, so after
Lightning's ``StochasticWeightAveraging`` has copied the averaged weights into the model and
updated BatchNorm with an extra *training-mode* epoch, dropout on) it recomputes the running
statistics of every BatchNorm an active regularizer reaches, with dropout off
(:func:`varshift.recalibrate`), measures each layer's variance shift before and after on the
same data, logs them to every logger of the trainer, and writes the JSON report.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "varshift.lightning needs Lightning: pip install 'varshift[lightning]'") from exc

from .io.atomic import write_text_atomic
from .report.results import RecalibrationReport


class RecalibrateBatchNorm(Callback):
    """Recalibrate the BatchNorm layers that dropout reaches, once fitting ends.

    Args:
        dataloader: calibration batches (tensors or ``(inputs, labels)`` pairs; a DataLoader).
            Default: the datamodule's ``train_dataloader()``.
        exact: the exact estimator (statistics on the inference path, level by level; shift
            1.000 afterwards) instead of the one-pass population estimator (default False).
        all_norms: recalibrate every BatchNorm, not only the affected ones (default False).
        eval_dataloader: held-out labelled batches for accuracy and NLL before and after
            (default: none, metrics on the calibration data).
        report_path: where the JSON report goes (default ``varshift-recalibrate.json`` in the
            trainer's ``log_dir``, else its ``default_root_dir``); None: no file.
        threshold: a recalibrated layer whose shift afterwards reaches this is reported as
            failing (``bool(callback.report)``), default 1.1.
        log_prefix: prefix of the logged metric names (default ``varshift``).

    After fitting, ``callback.report`` holds the :class:`~varshift.reports.RecalibrationReport`.
    The metrics logged are ``{prefix}/{layer}/shift_before``, ``{prefix}/{layer}/shift_after``
    per BatchNorm layer and ``{prefix}/max_shift_before``, ``{prefix}/max_shift_after``.
    Under DDP every process recalibrates its own copy with the loader it is given (pass the
    same, unsharded loader to each); only global rank 0 writes and logs.
    """

    REPORT_NAME = "varshift-recalibrate.json"

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        *,
        exact: bool = False,
        all_norms: bool = False,
        eval_dataloader: Iterable[Any] | None = None,
        report_path: Any = ...,
        threshold: float = 1.1,
        log_prefix: str = "varshift",
    ) -> None:
        super().__init__()
        self.dataloader = dataloader
        self.exact = exact
        self.all_norms = all_norms
        self.eval_dataloader = eval_dataloader
        self.report_path = report_path
        self.threshold = threshold
        self.log_prefix = log_prefix
        self.report: RecalibrationReport | None = None
        self.written: str | None = None

    def _batches(self, trainer: Any) -> Iterable[Any]:
        if self.dataloader is not None:
            return self.dataloader
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            return datamodule.train_dataloader()
        raise ValueError(
            "RecalibrateBatchNorm needs calibration batches: pass dataloader=..., or fit with a "
            "datamodule whose train_dataloader() gives them")

    def _path(self, trainer: Any) -> str | None:
        if self.report_path is None:
            return None
        if self.report_path is not ...:
            return os.fspath(self.report_path)
        folder = getattr(trainer, "log_dir", None) or trainer.default_root_dir
        return os.path.join(folder, self.REPORT_NAME)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        from .fix.recalibration import recalibrate

        _, report = recalibrate(
            pl_module, self._batches(trainer), exact=self.exact, all_norms=self.all_norms,
            inplace=True, eval_batches=self.eval_dataloader, threshold=self.threshold,
            device=pl_module.device,
        )
        report.notes.append(
            f"recalibrated by the Lightning callback after epoch {trainer.current_epoch} "
            f"(global step {trainer.global_step})")
        self.report = report
        if not trainer.is_global_zero:
            return
        self._log(trainer, report)
        path = self._path(trainer)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_text_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")
            self.written = path

    def _log(self, trainer: Any, report: RecalibrationReport) -> None:
        p = self.log_prefix
        metrics: dict[str, float] = {}
        for layer in report.layers:
            metrics[f"{p}/{layer.name}/shift_before"] = layer.shift_before
            metrics[f"{p}/{layer.name}/shift_after"] = layer.shift_after
        fixed = report.recalibrated
        if fixed:
            metrics[f"{p}/max_shift_before"] = max(l.shift_before for l in fixed)
            metrics[f"{p}/max_shift_after"] = max(l.shift_after for l in fixed)
        if report.before is not None and report.after is not None:
            metrics[f"{p}/accuracy_before"] = report.before.accuracy
            metrics[f"{p}/accuracy_after"] = report.after.accuracy
            metrics[f"{p}/nll_before"] = report.before.nll
            metrics[f"{p}/nll_after"] = report.after.nll
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
