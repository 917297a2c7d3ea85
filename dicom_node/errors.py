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
