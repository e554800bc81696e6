"""Print the figures of docs/reliability.md's "Bad input, generated": the same examples as the pytest run.

    .venv/bin/python -m tests.property.report

Runs the suite's hypothesis tests (same profile, same derandomized examples) outside pytest and prints
how many manifests were generated, the valid/invalid split, the outcome per layer, crashes, and the time.
A crash or a broken property stops it with the failing example, as in pytest.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/, as pytest puts it on sys.path

from . import conftest  # noqa: E402,F401  (registers and loads the hypothesis profile)
from . import pipeline as p  # noqa: E402
from . import test_generated_manifests as gen  # noqa: E402
from . import test_hostile_strings as hostile  # noqa: E402

TESTS = [
    gen.test_valid_manifests_pass_every_layer,
    gen.test_invalid_manifests_are_rejected_at_the_earliest_layer,
    hostile.test_hostile_strings_pass_through_literally,
]
ORDER = [p.REQUEST, p.SCHEMA, p.CEL, p.OPERATOR, p.ACCEPTED]


def main() -> int:
    start = time.perf_counter()
    crashes = 0
    for test in TESTS:
        try:
            test()
        except Exception:  # a property failed or a layer crashed: show it, count it, go on
            crashes += 1
            traceback.print_exc()
    seconds = time.perf_counter() - start
    s = p.STATS
    print(f"manifests generated: {s['manifests']}")
    print(f"  valid: {s['valid']}   invalid: {s['invalid']}")
    for outcome in ORDER:
        print(f"  {s[outcome]:6d}  {outcome}")
    print("mutations (invalid manifests by what was broken):")
    for key in sorted(k for k in s if k.startswith("mutation: ")):
        print(f"  {s[key]:6d}  {key.removeprefix('mutation: ')}")
    print(f"failed properties or crashes: {crashes}")
    print(f"time: {seconds:.0f} s (one process, profile {os.environ.get('FTJ_HYPOTHESIS_PROFILE', 'ci')})")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
