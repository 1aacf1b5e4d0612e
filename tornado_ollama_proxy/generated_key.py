"""The key a proxy on a public address requires when none is configured.

As Jupyter and code-server do: rather than serve anyone who learns a pod's
URL, the proxy makes a 256-bit key once, keeps it in a file only its user may
read, and requires it; later starts reuse it. The file is created exclusively
and whole (written aside, then linked into place), so that several processes
starting at once agree on one key.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

NAME = "generated"  # the key's name in logs, metrics and the status page
BITS = 256
FIX = "set generated_key_file to a path this user may write, or set api_keys"


class GeneratedKeyError(Exception):
    """The key file cannot be made or read; the message names it and what to do."""


def key_path(setting: str | None) -> Path:
    """Where the generated key is kept: `generated_key_file`, or the default place."""
    return Path(setting) if setting else default_path()


def default_path() -> Path:
    """``$XDG_STATE_HOME/tornado-ollama-proxy/key``, by default under ``~/.local/state``."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "tornado-ollama-proxy" / "key"


@dataclass(frozen=True)
class GeneratedKey:
    """The key, where it is kept, and whether this start made it."""

    key: str = field(repr=False)
    path: Path
    created: bool


def load_or_create(path: Path) -> GeneratedKey:
    """The key kept in `path`, made there first if there is none."""
    try:
        return GeneratedKey(_read(path), path, False)
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(BITS // 8)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(key + "\n")
        try:
            os.link(aside, path)  # fails if another process made it first: then its key is the one
        except FileExistsError:
            return GeneratedKey(_read(path), path, False)
        finally:
            aside.unlink()
    except OSError as error:
        raise GeneratedKeyError(f"generated_key_file: {path} cannot be created: {error.strerror}; {FIX}") from None
    return GeneratedKey(key, path, True)


def _read(path: Path) -> str:
    """The key in `path`, which must be this user's own file that no one else may read:
    never a link (to a file someone else chose) nor a file others could have written."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as error:
        reason = "is a symbolic link" if error.errno == errno.ELOOP else f"cannot be read: {error.strerror}"
        raise GeneratedKeyError(f"generated_key_file: {path} {reason}; {FIX}") from None
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(file.fileno())
        if status.st_uid != os.getuid():
            raise GeneratedKeyError(f"generated_key_file: {path} belongs to another user; {FIX}")
        if status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise GeneratedKeyError(
                f"generated_key_file: {path} may be read or written by others "
                f"(mode {stat.S_IMODE(status.st_mode):04o}): chmod 600 it, or remove it to have a new one made"
            )
        content = file.read(1024)
    try:
        key = content.decode("ascii").strip()
    except UnicodeDecodeError:
        key = ""
    if not key or len(key.split()) != 1:
        raise GeneratedKeyError(f"generated_key_file: {path} holds no key; remove it to have a new one made")
    return key
