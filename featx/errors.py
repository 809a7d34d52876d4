"""One exception type for every mistake a user can fix; the CLI prints it as one line."""


class FeatxError(ValueError):
    """A problem with the user's input or environment, with the fix in the message. A ``ValueError``, as
    scikit-learn's estimator contract expects of invalid input."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (empty if it has none), for quoting it in a one-line error."""
    return str(exc).splitlines()[0] if str(exc) else ""


def listed(names: list, shown: int = 8) -> str:
    """The first ``shown`` names, and how many more there are, for a one-line message."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")
