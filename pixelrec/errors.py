"""The one exception type users see.

Every bad-input condition raises `PixelrecError` with a one-line message that names the
file, row or item at fault. The CLI prints it as ``error: <message>`` and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class PixelrecError(Exception):
    """A user-facing error: bad input, incompatible files, unknown ids."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
