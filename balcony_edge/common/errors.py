"""The one exception family of balcony-edge: each carries a message naming the bad value and the fix."""


class BalconyError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


class BaseModelError(BalconyError):
    """The base model cannot be found, read or used."""


class CheckpointError(BalconyError):
    """A balcony checkpoint is missing, incomplete or belongs to another model."""


class DataError(BalconyError):
    """Training or evaluation text cannot be read or is too short."""


class ExitsError(BalconyError):
    """An exit list is malformed or out of range."""


class ExportError(BalconyError):
    """An ONNX export cannot be made with the given options, or failed its verification."""


class ManifestError(BalconyError):
    """An export folder's manifest is missing, malformed or of another schema version."""


class SignalError(BalconyError):
    """A device-signal source or trace is malformed or cannot be used."""


class ControllerError(BalconyError):
    """A budget, exit profile or controller setting is malformed or names an exit that does not exist."""


class TelemetryError(BalconyError):
    """A telemetry file cannot be read, or a plot of it cannot be made."""


class TrainingStopped(BalconyError):
    """Training was stopped by a signal after saving a checkpoint that --resume continues."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number  # the CLI exits with 128 + it, as the signal itself would have


class IntegrityError(ManifestError):
    """An export folder names a file outside itself, lacks a file, points graph data elsewhere, or differs from its
    checksums."""


def first_line(error: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
