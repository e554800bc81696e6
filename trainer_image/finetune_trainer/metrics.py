"""Prometheus metrics of the trainer (rank 0 serves them). Label `finetune_job`, never `job`:
Prometheus renames a scraped `job` label to `exported_job` because it sets its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

LABELS = ("finetune_job", "namespace")


class TrainerMetrics:
    def __init__(self, job: str, namespace: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, (*LABELS, *extra), registry=r)

        self._labels = {"finetune_job": job, "namespace": namespace}
        self.epoch = gauge("finetune_trainer_epoch", "Epochs completed.").labels(**self._labels)
        self.step = gauge("finetune_trainer_step", "Optimizer steps completed.").labels(**self._labels)
        self.train_loss = gauge("finetune_train_loss", "Mean training loss of the last epoch (running mean during it).").labels(**self._labels)
        self.val_loss = gauge("finetune_validation_loss", "Validation loss of the last epoch.").labels(**self._labels)
        self._val_metric = gauge("finetune_validation_metric", "Validation metric of the last epoch.", ("metric",))
        self.learning_rate = gauge("finetune_learning_rate", "Learning rate of the first parameter group.").labels(**self._labels)
        self.samples_per_second = gauge("finetune_samples_per_second", "Training throughput of this process.").labels(**self._labels)
        self.batch_size = gauge("finetune_batch_size", "Per-device batch size (found automatically when unset).").labels(**self._labels)
        self.gradient_accumulation_steps = gauge(
            "finetune_gradient_accumulation_steps", "Batches per optimizer step (raised when the requested batch did not fit)."
        ).labels(**self._labels)
        self.best_metric = gauge("finetune_best_metric", "Best value of the early-stopping metric so far.").labels(**self._labels)
        self.early_stops = Counter(
            "finetune_trainer_early_stops", "Runs this trainer ended early (patience or stop request).", LABELS, registry=r
        ).labels(**self._labels)

    def val_metric(self, name: str, value: float) -> None:
        self._val_metric.labels(**self._labels, metric=name).set(value)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
