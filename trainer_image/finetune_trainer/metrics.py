"""Prometheus metrics of the trainer (rank 0 serves them). Label `finetune_job`, never `job`:
Prometheus renames a scraped `job` label to `exported_job` because it sets its own."""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

LABELS = ("finetune_job", "namespace")


class ScrapeClock:
    """Remembers the scrapes whose answers have been written out, by the time each request began.

    A scrape counts once its body is written, not when the registry was collected: the process exits as soon
    as linger() returns, and a scrape that was collected but not yet sent is lost with it (a CI run caught
    exactly that). It is dated by when it began: one that began before the final values were set may still
    be writing when linger() starts, and it does not carry them (a later CI run caught that)."""

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=8)

    def wrap(self, app):
        """A WSGI app that ticks the clock once the body of an answer is written (every path prometheus_client
        serves is the metrics): wsgiref calls the body's close() after its last write, and only then."""
        clock = self

        class _Body(list):
            def __init__(self, chunks, began: float) -> None:
                super().__init__(chunks)
                self.began = began

            def close(self) -> None:
                clock.times.append(self.began)

        def scraped(environ, start_response):
            began = time.monotonic()
            return _Body(app(environ, start_response), began)

        return scraped

    def _budget(self, max_seconds: float) -> float:
        """About two of the scraper's intervals (at most max_seconds), from the scrapes seen so far."""
        times = sorted(tuple(self.times))  # a snapshot (scrape threads append); they may finish out of order
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return min(max_seconds, 2 * statistics.median(gaps) + 1) if gaps else max_seconds

    def wait_for_scrape_after(self, mark: float, max_seconds: float, poll: float = 0.1) -> bool:
        """Block until a scrape that began after `mark` has been answered, if anyone scrapes us at all:
        without a scraper there is nothing to wait for; with one, wait about two of its intervals. The
        budget is re-read while waiting: a scrape still being written at `mark` refines it."""
        if not self.times or max_seconds <= 0:
            return False
        start = time.monotonic()
        while time.monotonic() < start + self._budget(max_seconds):
            if max(tuple(self.times)) > mark:
                return True
            time.sleep(poll)
        return False


class TrainerMetrics:
    def __init__(self, job: str, namespace: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, (*LABELS, *extra), registry=r)

        self._labels = {"finetune_job": job, "namespace": namespace}
        self.scrapes = ScrapeClock()
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
        self.last_progress = gauge(
            "finetune_trainer_last_progress_timestamp_seconds",
            "Unix time of the trainer's last heartbeat, sent only while steps, evaluation batches or checkpoint saves advance.",
        ).labels(**self._labels)
        self.stall_timeout = gauge(
            "finetune_trainer_stall_timeout_seconds",
            "The job's spec.watchdog.stallTimeoutSeconds as it is now (0: no watchdog): the operator's watchdog fails the "
            "job when the last heartbeat is older than this, and the FineTuneJobStalled alert compares with it too.",
        ).labels(**self._labels)
        self.best_metric = gauge("finetune_best_metric", "Best value of the early-stopping metric so far.").labels(**self._labels)
        self.early_stops = Counter(
            "finetune_trainer_early_stops", "Runs this trainer ended early (patience or stop request).", LABELS, registry=r
        ).labels(**self._labels)

        self._stage = gauge(
            "finetune_trainer_stage_seconds",
            "Seconds each start-up stage took, process start to the first optimizer step (setup, data, modelLoad, firstStep).",
            ("stage",),
        )
        self._test_metric = gauge(
            "finetune_test_metric", "The best checkpoint's metrics on the held-out test split, evaluated once at the end.",
            ("metric",),
        )

    def stage(self, name: str, seconds: float) -> None:
        self._stage.labels(**self._labels, stage=name).set(seconds)

    def test_metric(self, name: str, value: float) -> None:
        self._test_metric.labels(**self._labels, metric=name).set(value)

    def val_metric(self, name: str, value: float) -> None:
        self._val_metric.labels(**self._labels, metric=name).set(value)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """prometheus_client's start_http_server, with the scrape clock around its WSGI app."""
        app = self.scrapes.wrap(make_wsgi_app(self.registry))
        httpd = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
        self.served = True

    served = False

    def linger(self, max_seconds: float) -> bool:
        """Keep serving until Prometheus has scraped the final values (the process is about to exit, and
        a pod that is gone cannot be scraped: without this the last epoch and the early-stop counter are
        usually lost)."""
        return self.served and self.scrapes.wait_for_scrape_after(time.monotonic(), max_seconds)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        """One log line per scrape would drown the trainer's own log."""
