"""User-facing errors.

Anything a user can cause (a wrong path, a malformed config, a bad flag value) raises a
`DSV3Error` subclass whose message is one complete sentence naming the culprit. The CLI prints
that message on one line and exits with status 2; the server turns it into a 4xx JSON error.
"""


class DSV3Error(Exception):
    """Base class for errors caused by user input rather than by a bug in dsv3."""


class ConfigError(DSV3Error, ValueError):
    """A config.json field is missing, of the wrong type, or contradicts another field."""


class CheckpointError(DSV3Error):
    """A checkpoint directory or tensor file is missing, truncated or does not fit the model."""
