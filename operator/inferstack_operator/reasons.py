"""Why a reconcile stopped: the one failure type, and every Ready-condition reason string.

Handlers, reconcile and status use these constants only, so a reason is spelled once.
"""

from __future__ import annotations

# Ready=True
ALL_REPLICAS_READY = "AllReplicasReady"
# Ready=False, from the children's state (a later child event may clear them)
PROGRESSING = "Progressing"
SCALED_TO_ZERO = "ScaledToZero"
PODS_FAILING = "PodsFailing"
# Ready=False, that only a reconcile may clear
INVALID_SPEC = "InvalidSpec"
WAITING_FOR_VOLUME = "WaitingForVolume"
CHILD_CONFLICT = "ChildConflict"
CHILD_TERMINATING = "ChildTerminating"
IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"
APPLY_FAILED = "ApplyFailed"
API_ERROR = "ApiError"
# Available
MINIMUM_REPLICAS_READY = "MinimumReplicasReady"
NO_SERVING_PATH = "NoServingPath"
# Autoscaling (its own condition; never fails the service)
AUTOSCALING_ACTIVE = "AutoscalingActive"
KEDA_NOT_INSTALLED = "KEDANotInstalled"
# Events
CREATED = "Created"
UPDATED = "Updated"
REPAIRED = "Repaired"
DELETED = "Deleted"
IGNORED_SETTINGS = "IgnoredSettings"

PROBLEM_REASONS = frozenset({
    INVALID_SPEC, WAITING_FOR_VOLUME, CHILD_CONFLICT, CHILD_TERMINATING,
    IMMUTABLE_FIELD_CHANGED, APPLY_FAILED, API_ERROR,
})


class ReconcileError(Exception):
    """A reconcile that cannot finish: what to show (reason, message) and whether to retry.

    ``permanent``: nothing changes until the user edits something (no retry, a Warning event).
    Otherwise kopf retries after ``delay`` seconds.
    """

    def __init__(self, reason: str, message: str, *, permanent: bool = False, delay: float = 10.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permanent = permanent
        self.delay = delay


class SpecError(ReconcileError):
    """The spec cannot be served; the message tells the user what to change."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_SPEC, message, permanent=True)
