"""User-facing errors.

A ``UserError`` is bad input (a missing file, a wrong shape, a contradictory
flag): the CLI prints its message as one line and exits 2, never a traceback.
Anything else is a bug in mapc and is allowed to raise.
"""


class UserError(Exception):
    """Bad input; the message names the file or flag, what is wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
