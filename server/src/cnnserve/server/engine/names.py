"""The check every model name and version from a request passes before the engine uses it."""

from __future__ import annotations

from cnnserve.common.repository import MODEL_NAME, ConfigError, check_model_name
from cnnserve.server.errors import InvalidRequest


def checked(name: str, version: str = "") -> tuple[str, str]:
    """``(name, version)`` once both are well-formed: the one check every RPC's names pass.

    A model name is one folder name of the repository (common.repository.MODEL_NAME: no path
    separator, no "..", never ""), so no name reaches the filesystem as a path and no alias
    of a model ("m/.", "./m") loads a second copy. A version is "" (newest) or ASCII digits
    ("²".isdigit() is true, but int() refuses it). Raises InvalidRequest; its message quotes
    at most 64 characters of the name and says nothing about the filesystem.
    """
    if MODEL_NAME.fullmatch(name) is None:  # the per-request cost is this one match
        try:
            check_model_name(name)
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
    if version and not (version.isascii() and version.isdigit()):
        shown = version if len(version) <= 20 else version[:20] + "..."
        raise InvalidRequest(f"model version {shown!r} is not allowed: use \"\" (the newest) "
                             "or a positive integer in ASCII digits")
    return name, version
