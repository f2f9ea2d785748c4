"""Exception family: every error a user can cause is a SpectraError with a message naming cause and fix."""


class SpectraError(Exception):
    """Base class; the CLI prints these as one line and exits with code 2."""


class ConfigError(SpectraError):
    """An invalid model configuration or an unknown preset name."""


class CheckpointError(SpectraError):
    """A checkpoint directory or file that is missing, truncated or inconsistent."""


class FormatError(SpectraError):
    """Packed-weight data that does not match its declared format."""


class DeviceError(SpectraError):
    """A requested device (e.g. CUDA) that is not available."""


class DataError(SpectraError):
    """Training or evaluation data that is missing, empty or incompatible."""


class SpectraWarning(UserWarning):
    """Base class of warnings about the user's input (an ignored tensor, a fit that did not converge); the CLI
    prints them as one line."""


class TrainingError(SpectraError):
    """A training run that cannot go on (a non-finite loss, a run directory that would be overwritten)."""


class OutputError(SpectraError):
    """An output path that would overwrite something spectra did not write, or that another process holds."""
