"""The one exception type a user can cause; the CLI turns it into a message and an exit code."""


class SdltagError(Exception):
    """An error caused by input the user controls (a file, an option, a folder).

    The message names the input and says how to fix it. ``exit_code`` follows the
    CLI convention: 2 for usage errors (bad option or file), 1 for failed work.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
