"""The hypothesis profile of the generated bad-input suite: fixed, CI-sized, reproducible.

`derandomize` derives every example from the test's own name, so each run (CI or a laptop) checks
exactly the same manifests and a failure reproduces with the same command; `database=None` keeps
no state between runs. FTJ_HYPOTHESIS_PROFILE=dev runs a tenth of the examples while iterating.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Tests size themselves with pipeline.examples(n): n under "ci", n/20 under "dev".
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=5)
settings.load_profile(os.environ.get("FTJ_HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    from .pipeline import STATS

    if STATS:
        terminalreporter.write_sep("-", "generated FineTuneJob manifests")
        for key, count in sorted(STATS.items()):
            terminalreporter.write_line(f"{count:6d}  {key}")
