"""One exception type for mistakes a user can fix; the CLIs print it as one line."""


class UserError(ValueError):
    """Bad input, a missing file or a wrong setting; the message names the file, line or key."""
