"""`python -m finetune_operator`: run the FineTuneJob operator (settings from FTO_* variables)."""

from __future__ import annotations

import logging

import kopf

from . import logs, metrics
from .handlers.kopf_handlers import register
from .handlers.reconcile import Reconciler
from .handlers.sweep import SweepReconciler
from .handlers.sweep import register as register_sweeps
from .kube.client import ApiError, KubeClient, RetryPolicy, load_configuration
from .kube.peering import check_peering
from .settings import from_env


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
    register(registry, reconciler, settings)
    if not settings.peering:
        # With peering a replica may start paused: kopf delivers events only to the active one, and priming
        # would queue every job on every replica.
        try:
            log.info("cache primed with %d jobs", reconciler.prime())
        except ApiError as err:  # the watches' own listings fill it then, as before
            log.warning("could not prime the cache (%s); starting from the watches' listings", err)
    reconciler.start(settings.workers)
    sweeps = SweepReconciler(client, settings)
    register_sweeps(registry, sweeps)
    sweeps.start()
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
        sweeps.close()
        reconciler.close()
        client.close()


if __name__ == "__main__":
    main()
