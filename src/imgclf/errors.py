"""User-facing errors: one line that names the file or setting and says how to fix it."""


class ImgclfError(Exception):
    """An error caused by the user's input (data, config, run directory).

    The CLI prints ``str(error)`` as a single line and exits with status 2, never a traceback.
    """


class DataError(ImgclfError):
    """The dataset folder, CSV or an image in it cannot be used as it is."""


class ConfigError(ImgclfError):
    """A configuration value is unknown, of the wrong type or out of range."""


class RunDirError(ImgclfError):
    """A run directory is missing a file or holds a damaged one."""


class PeerError(ImgclfError):
    """Another rank's error, mirrored so this rank stops too; the CLI leaves the saying to that rank."""
