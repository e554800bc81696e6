"""Where models and datasets live: `package:<pkg>[/sub]`, a PVC mount, or a plain path."""

from __future__ import annotations

import importlib.util
import os

PACKAGE_PREFIX = "package:"


def resolve_path(name: str, *, pvc_mount: str | None = None) -> str:
    """`package:<pkg>[/sub]` -> `<dir of pkg>/<sub>`; a relative name under a PVC -> `<mount>/<name>`.

    Anything else (an absolute path, a hub id) is returned unchanged, so callers decide whether
    a name that is not a local directory means the hub.
    """
    if name.startswith(PACKAGE_PREFIX):
        package, _, sub = name[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not (spec.origin or spec.submodule_search_locations):
            raise FileNotFoundError(f"{name}: Python package {package!r} is not installed")
        base = os.path.dirname(spec.origin) if spec.origin else next(iter(spec.submodule_search_locations))
        path = os.path.join(base, sub) if sub else base
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: {path} does not exist")
        return path
    if pvc_mount and not name.startswith(pvc_mount.rstrip("/") + "/"):
        # The API says `name` is a path inside the claim, which the operator mounts at `pvc_mount`.
        return os.path.join(pvc_mount, name.lstrip("/"))
    return name
