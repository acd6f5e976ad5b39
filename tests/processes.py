"""What /proc tells the tests of a process."""


def left(pid: int) -> str | None:
    """What is left of process ``pid``: "running", "a zombie" (ended, never waited for), or None.

    A process can end between the opening of its stat file and the reading of it: the read then
    raises ProcessLookupError, which means it is gone too."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return "a zombie" if state == "Z" else "running"
