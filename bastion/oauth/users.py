"""Local users who log in at the authorization server; passwords hashed with Argon2id."""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from bastion.names import check_name, check_new_name
from bastion.oauth.store import OAuthStore

_HASHER = PasswordHasher()


@functools.cache
def _absent_user_hash(hasher: PasswordHasher) -> str:
    """Verified against when the user does not exist, so both cases take the same time."""
    return hasher.hash("bastion: no such user")


class UserError(ValueError):
    pass


def validate_username(username: str) -> None:
    """Whether ``username`` could name a user at all (one from a provider too)."""
    check_name(username, "a username", UserError)


def validate_password(password: str) -> None:
    if len(password) < 8:
        raise UserError("a password has at least 8 characters")


def validate_new_user(username: str, password: str) -> None:
    """What `create_user` checks before it reads the store: the name (one made here must not
    read as another: `bastion.names.lookalike_problem`), then the password."""
    check_new_name(username, "a username", UserError)
    validate_password(password)


def hash_password(password: str) -> str:
    validate_password(password)
    return _HASHER.hash(password)


def change_password(
    store: OAuthStore, username: str, password: str, now: float, *, actor: str
) -> None:
    """Give ``username`` a new password, ending their sessions, grants and tokens
    (`OAuthStore.change_password`)."""
    if not store.change_password(username, hash_password(password), now, actor=actor):
        raise UserError(f"no user {username!r}")


def create_user(store: OAuthStore, username: str, password: str, now: float, *, actor: str) -> None:
    validate_new_user(username, password)
    if any(user[0] == username for user in store.users()):
        raise UserError(f"user {username!r} already exists")
    if problem := store.user_name_problem(username):
        raise UserError(problem)
    store.create_user(username, hash_password(password), now, actor=actor)


def check_password(store: OAuthStore, username: str, password: str) -> bool:
    """Whether an enabled user has this password; rehashes when the parameters have grown."""
    stored = store.user_password_hash(username)
    try:
        _HASHER.verify(stored or _absent_user_hash(_HASHER), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    if stored is None:
        return False
    if _HASHER.check_needs_rehash(stored):
        store.rehash_password(username, _HASHER.hash(password))
    return True
