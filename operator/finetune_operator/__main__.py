"""`python -m finetune_operator`: run the FineTuneJob operator (settings from FTO_* variables)."""

from __future__ import annotations

import logging
import sys

# kopf imports the `kubernetes` package only to recognise its model objects in kopf.adopt() and friends, which
# this operator never passes; loading its 767 generated model modules would cost ~70 MiB of the operator's memory
# (measured: `python -c "import kopf"` peaks at 94 MiB with the package importable, bench/operator_throughput.py
# reports the operator's RSS). Marked absent before kopf is imported, so kopf takes its no-client path; the
# operator's own client does not use the package either (kube/client.py).
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

import kopf  # noqa: E402

from . import logs, metrics  # noqa: E402
from .handlers.kopf_handlers import register  # noqa: E402
from .handlers.reconcile import Reconciler  # noqa: E402
from .handlers.sweep import SweepReconciler  # noqa: E402
from .handlers.sweep import register as register_sweeps  # noqa: E402
from .handlers.watches import Watches  # noqa: E402
from .kube.client import KubeClient, RetryPolicy, load_configuration  # noqa: E402
from .kube.peering import check_peering  # noqa: E402
from .memory import MemoryTrimmer  # noqa: E402
from .settings import from_env  # noqa: E402


def main() -> None:
    settings = from_env()
    logs.configure(settings.log_format, settings.log_level)
    log = logging.getLogger("finetune_operator")
    if settings.extra:
        log.warning("ignoring unknown settings %s", ", ".join(sorted(settings.extra)))
    metrics.serve(settings.metrics_port)
    client = KubeClient(load_configuration(settings.api_pool_size), settings.api_timeout_seconds,
                        settings.api_connect_timeout_seconds, qps=settings.api_qps, burst=settings.api_burst,
                        retry=RetryPolicy(attempts=settings.api_retries))
    peering = check_peering(settings.peering, settings.clusterwide, client.get)
    log.log(peering.level, peering.message)
    if not peering.ok:
        client.close()
        raise SystemExit(1)
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(client, settings)
    sweeps = SweepReconciler(client, settings)
    register(registry, reconciler, settings)
    register_sweeps(registry, sweeps, kopf_jobs=bool(settings.peering))
    watches = None
    if not settings.peering:
        # Standalone, FineTuneJobs, children and pods come from our own Reflectors (handlers/watches.py), listed
        # before any pass. With peering a replica may start paused: kopf watches them then, and delivers events
        # only to the active replica.
        watches = Watches(client, reconciler.cache, reconciler.queue, settings, trial=sweeps.trial_event)
        log.info("cache primed with %d jobs", watches.sync())
    reconciler.start(settings.workers)
    if watches is not None:
        watches.start()
    sweeps.start()
    trimmer = MemoryTrimmer(lambda: reconciler.passes + sweeps.passes, settings.memory_trim_seconds)
    if settings.memory_trim_seconds > 0:
        trimmer.start()
    log.info("starting finetune-operator: %s, metrics port %s, health port %s",
             "cluster-wide" if settings.clusterwide else f"namespaces {','.join(settings.namespaces)}",
             settings.metrics_port, settings.health_port)
    try:
        kopf.run(
            registry=registry,
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            standalone=not settings.peering,
            peering_name=settings.peering or None,
            priority=settings.peering_priority,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        )
    finally:
        if watches is not None:
            watches.close()
        trimmer.close()
        sweeps.close()
        reconciler.close()
        client.close()


if __name__ == "__main__":
    main()
