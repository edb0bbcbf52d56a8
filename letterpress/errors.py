"""Exceptions a user can act on. The CLI prints them as one line; the server turns them into JSON errors."""


class LetterpressError(Exception):
    """Base class for every error letterpress raises on purpose."""


class ConfigError(LetterpressError):
    """A config.json / generation_config.json that we cannot interpret."""


class CheckpointError(LetterpressError):
    """A checkpoint that is missing, truncated or does not match its config."""


class RequestError(LetterpressError):
    """A generation request with invalid arguments (bad prompt, bad sampling parameters, too long, ...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the request field at fault, for the server's error (None: not one field)


class NotSupportedError(LetterpressError):
    """A feature the checkpoint may have but letterpress does not support yet (e.g. images)."""


class DataError(LetterpressError):
    """A training data file with a line we cannot use (the message names the file and line)."""


class TrainError(LetterpressError):
    """Training settings that do not fit together (batch sizes, LoRA targets, resume state, ...)."""
