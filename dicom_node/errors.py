"""The node's error hierarchy.

What a job or a send does next depends on the class of the error: a
:class:`RetryableError` is tried again with backoff, a :class:`PermanentError`
fails at once with its reason.
"""


class DicomNodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(DicomNodeError):
    """A configuration file, variable or flag is invalid.

    The message names the source (file or variable), the key, the value and
    what was expected, on one line.
    """


class RetryableError(DicomNodeError):
    """A failure that may go away by itself (peer busy, disk full)."""


class PermanentError(DicomNodeError):
    """A failure that will happen again on retry (unsupported input)."""


class InfrastructureError(RetryableError):
    """The compute a job needs failed, not the job's data (a lost Ray actor or cluster): retried
    like any :class:`RetryableError`, but never answered with a "not analysed" report, even on
    the last attempt: the series was never judged, so the PACS is told nothing."""


class UnavailableError(InfrastructureError):
    """The compute is out of reach for now (the Ray cluster is down or was lost): the queue hands
    the job back without counting the attempt, so an outage of any length costs no attempt."""
