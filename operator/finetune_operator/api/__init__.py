"""The FineTuneJob API: types, presets, validation and CRD generation. Pure: no Kubernetes client."""

from .constants import API_VERSION, GROUP, KIND, PLURAL, VERSION, Condition, Phase, Reason
from .spec import FineTuneJobSpec
from .status import FineTuneJobStatus
from .validation import InvalidFineTuneJob, Problem, ResolvedJob, parse_spec, resolve_spec, validate_manifest

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "Condition", "Phase", "Reason", "FineTuneJobSpec",
    "FineTuneJobStatus", "InvalidFineTuneJob", "Problem", "ResolvedJob", "parse_spec", "resolve_spec", "validate_manifest",
]
