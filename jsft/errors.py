"""jsft's user-facing errors: each message names the field, row, file or tensor and the fix; the commands print it
alone and exit 2 (jsft.cli). Defined here, imported by the modules that raise them, so no module imports another
only for its error class."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


class CheckpointError(ValueError):
    """A checkpoint (HF files or a jsft checkpoint) that cannot be read or does not fit the model; the message names
    the tensor, file or field."""
