"""``${NAME}`` in bastion.toml: a value (a secret, usually) read from the environment when the
settings are read, so the file itself holds no secret."""

from __future__ import annotations

import re
from collections.abc import Mapping

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(
    value: str, env: Mapping[str, str], where: str, error: type[Exception] = ValueError
) -> str:
    """``value`` with each ``${NAME}`` replaced by ``env[NAME]``; ``error`` (naming ``where``) for
    a variable the environment does not have."""

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in env:
            raise error(f"{where} names ${{{name}}} but the environment has no {name}")
        return env[name]

    return _VARIABLE.sub(sub, value)
