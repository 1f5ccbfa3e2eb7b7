"""One exception type for mistakes a user can fix; the CLIs print it as one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type): enough for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class UserError(ValueError):
    """Bad input, a missing file or a wrong setting; the message names the file, line or key."""
