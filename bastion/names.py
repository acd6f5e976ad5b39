"""Names that people give and read back on a line of their own: a username, an API key's name."""

from __future__ import annotations

# The longest name (characters): a username or a key's name.
MAX_NAME_LENGTH = 128


def check_name(
    value: object, what: str, error: type[Exception] = ValueError, most: int = MAX_NAME_LENGTH
) -> str:
    """``value`` if it is 1 to ``most`` printable characters without surrounding spaces, else
    ``error`` saying so of ``what``. Printable: no newline or other control character, which
    would forge a line of `bastion keys list` or `users list`, or of a log."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > most
        or not value.isprintable()
        or value.strip() != value
    ):
        raise error(f"{what} is 1 to {most} printable characters without surrounding spaces")
    return value
