"""Upload the results to an object store (spec.output.uri) through fsspec, when training ends.

s3:// goes through s3fs (botocore's credential chain: the AWS_* variables of spec.output.credentialsSecret,
`AWS_ENDPOINT_URL` for S3-compatible stores, or the pod's IAM role); gs:// through gcsfs (optional: install it
into the image; credentials from GOOGLE_APPLICATION_CREDENTIALS, e.g. a Secret key of that name whose value is
the path of another key's file under /var/run/secrets/finetune/output, or workload identity;
`STORAGE_EMULATOR_HOST` for a GCS emulator, with `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs's default
filesystem asks a gRPC endpoint for the bucket's layout first, which an emulator does not serve, and retries for
minutes). fsspec also reads `FSSPEC_<PROTOCOL>_<OPTION>` variables, e.g.
FSSPEC_S3_ENDPOINT_URL or FSSPEC_GS_TOKEN, read again at upload time like the rest of the environment.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from finetune_contract.config import Paths

log = logging.getLogger("finetune_trainer")


class UploadError(RuntimeError):
    """The results could not be uploaded (they are still in the output directory)."""


def upload_results(output: Any, output_dir: str, job: str = "") -> list[str]:
    """Copy best/ and result.json (and checkpoints/ with uploadCheckpoints) under output.uri; returns the URLs."""
    uri = getattr(output, "uri", None)
    if not uri:
        return []
    try:
        import fsspec
    except ImportError as err:  # pragma: no cover - the trainer extra installs fsspec
        raise UploadError(f"spec.output.uri {uri} needs fsspec in the trainer image: {err}") from None
    base = uri.rstrip("/")
    names = [Paths.BEST_MODEL, Paths.RESULT] + ([Paths.CHECKPOINTS] if getattr(output, "upload_checkpoints", False) else [])
    try:
        # A fresh instance: credentials and endpoint come from this process's environment now, not a cached client
        # (nor fsspec's FSSPEC_* configuration as it was when something first imported fsspec).
        fsspec.config.set_conf_env(fsspec.config.conf)
        fs, _ = fsspec.core.url_to_fs(base, skip_instance_cache=True)
    except (ImportError, ValueError) as err:
        raise UploadError(f"spec.output.uri {uri}: no filesystem for it ({err}); s3:// needs s3fs, gs:// gcsfs") from None
    bucket = base.split("://", 1)[1].split("/", 1)[0]
    try:
        exists = fs.exists(bucket)
    except Exception as err:  # noqa: BLE001 - unreachable endpoint, bad credentials: one clear line
        raise UploadError(f"job {job}: cannot reach bucket {bucket} of spec.output.uri {uri}: {type(err).__name__}: {err}; "
                          f"the results are still in {output_dir}") from err
    if not exists:
        # Never create one: a typo would otherwise leave the model in a bucket nobody looks at (s3fs would make it).
        raise UploadError(f"job {job}: bucket {bucket} of spec.output.uri {uri} does not exist (the trainer does not "
                          f"create buckets); the results are still in {output_dir}")
    done = []
    for name in names:
        local = os.path.join(output_dir, name)
        if not os.path.exists(local):
            continue
        remote = f"{base}/{name}"
        try:
            if os.path.isdir(local):
                # put(a/, b/) copies the directory's content into b (fsspec's trailing-slash rule).
                fs.put(local.rstrip("/") + "/", remote + "/", recursive=True)
            else:
                fs.put(local, remote)
        except Exception as err:  # noqa: BLE001 - every backend raises its own errors; report one clear line
            raise UploadError(f"job {job}: uploading {local} to {remote} failed: {type(err).__name__}: {err}; "
                              f"the results are still in {output_dir}") from err
        done.append(remote)
    log.info("job %s: uploaded %s", job, ", ".join(done) or f"nothing (no results in {output_dir})")
    return done
