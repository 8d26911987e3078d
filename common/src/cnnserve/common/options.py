"""Command options as frozen dataclasses that generate their own flags, help and variables.

Every command (``serve``, ``train``, ``evaluate``, ``export``, ``batch``, ``classify``) has one
options class; each field says its help text (with unit and default), and this module turns
the fields into argparse flags and builds the value from parsed flags over environment
variables over defaults. Adding an option is adding one field. The flag's type comes from the
field's annotation: ``int``, ``float``, ``str``, ``Path``, ``bool`` (``--x/--no-x``), a
``Literal`` (its values are the choices), ``X | None`` (not given = None) and ``tuple[X, ...]``
(a repeated flag; in a variable, comma-separated). Standard library only, so a part's CLI can
describe its flags without importing the part.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from cnnserve.common.errors import CnnserveError

T = TypeVar("T")

_MISSING: Any = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str = "",
           aliases: tuple[str, ...] = (), positional: bool = False, metavar: str = "",
           env: bool | str = True, default_factory: Any = _MISSING, repr: bool = True,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag`` overrides the flag derived from the field name (``grpc_port`` -> ``--grpc-port``);
    ``aliases`` are further flags with the same meaning (e.g. Triton's spelling,
    ``--model-repository``), listed beside the flag in ``--help``;
    ``positional`` makes it an argument (required unless it has a default); ``env`` False
    keeps it out of the environment (secrets on the command line are worse, paths of one run
    are no setting); a string names the variable (after the prefix) instead of the flag.
    ``parse`` replaces the parser the annotation implies (it may raise
    ``argparse.ArgumentTypeError``, a usage error naming what is allowed). ``help`` should end
    with the default and give units.
    """
    metadata = {"help": help, "flag": flag, "aliases": tuple(aliases),
                "positional": positional, "metavar": metavar, "env": env, "parse": parse}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, repr=repr)
    return dataclasses.field(default=default, metadata=metadata, repr=repr)


def option_fields(cls: type) -> Iterator[dataclasses.Field[Any]]:
    """The option fields of ``cls``, in declaration order."""
    yield from (f for f in dataclasses.fields(cls) if "help" in f.metadata)


def flag_of(cls: type, name: str) -> str:
    """The flag of field ``name``, e.g. ``--grpc-port`` (the name itself when positional)."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    if f.metadata.get("positional"):
        return name
    return str(f.metadata.get("flag") or "--" + name.replace("_", "-"))


def env_of(cls: type, name: str, prefix: str) -> str:
    """The environment variable of field ``name``, e.g. ``CNNSERVE_GRPC_PORT``.

    A repeated option's variable takes a plural ``S`` (``--model`` -> ``CNNSERVE_MODELS``)
    unless the field names its variable (``env="URL"`` -> ``CNNSERVE_URL``).
    """
    named = cls.__dataclass_fields__[name].metadata.get("env")  # type: ignore[attr-defined]
    if isinstance(named, str):
        return prefix + named
    kind = _kind(cls, name)
    return prefix + flag_of(cls, name).lstrip("-").replace("-", "_").upper() + (
        "S" if kind.repeat else "")


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What the annotation of one field means for its flag."""

    parse: Callable[[str], Any]
    choices: tuple[Any, ...]
    repeat: bool
    boolean: bool
    optional: bool


def _kind(cls: type, name: str) -> _Kind:
    hint = typing.get_type_hints(cls)[name]
    optional = False
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        hint = args[0]
    repeat = get_origin(hint) is tuple
    if repeat:
        hint = get_args(hint)[0]
    choices: tuple[Any, ...] = ()
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        hint = type(choices[0])
    parsers: dict[Any, Callable[[str], Any]] = {Path: Path, int: int, float: float,
                                                bool: parse_bool}
    custom = cls.__dataclass_fields__[name].metadata.get("parse")  # type: ignore[attr-defined]
    if custom is not None:  # it parses the whole value: one flag, not a repeated one
        return _Kind(custom, (), False, False, optional)
    parse = parsers.get(hint, str)
    return _Kind(parse, choices, repeat, hint is bool and not repeat, optional)


def parser_of(cls: type, name: str) -> Callable[[str], Any]:
    """How one value of field ``name`` is parsed from text (a flag argument or a variable)."""
    return _kind(cls, name).parse


def choices_of(cls: type, name: str) -> tuple[Any, ...]:
    """The values field ``name`` allows (a ``Literal`` annotation's), or () for any."""
    return _kind(cls, name).choices


def aliases_of(cls: type, name: str) -> tuple[str, ...]:
    """The alias flags of field ``name`` (``option(aliases=...)``), e.g. Triton's spelling."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return tuple(f.metadata.get("aliases", ()))


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              env_prefix: str = "") -> None:
    """Add one flag (or positional argument) per option field of ``cls`` to ``parser``.

    ``parser`` may be an argument group, to show the flags under a heading. Fields named
    together in the class attribute ``EXCLUSIVE`` (a tuple of name tuples) become mutually
    exclusive flags: argparse refuses them together as a usage error.

    Flags default to None ("not given") so :func:`build_options` can tell a flag from a
    variable from a default. With ``env_prefix``, each help text names its variable. A
    field's aliases are registered as further spellings of the same flag (same destination,
    so the last one given wins, as with a repeated flag). A boolean flag also takes an
    explicit value, ``--x=false`` (Triton's form), besides ``--x`` and ``--no-x``.
    """
    groups: dict[str, Any] = {}
    for names in getattr(cls, "EXCLUSIVE", ()):
        group = parser.add_mutually_exclusive_group()
        groups.update((name, group) for name in names)
    for f in option_fields(cls):
        kind = _kind(cls, f.name)
        help_text = f.metadata["help"]
        if env_prefix and f.metadata["env"]:
            help_text += f" [env {env_of(cls, f.name, env_prefix)}]"
        if f.metadata["positional"]:
            positional: dict[str, Any] = {
                "type": kind.parse, "help": help_text,
                "metavar": f.metadata["metavar"] or f.name.upper()}
            if kind.repeat:
                positional["nargs"] = "+"
            elif f.default is not _MISSING:
                positional.update(nargs="?", default=None)
            parser.add_argument(f.name, **positional)
            continue
        if kind.boolean:
            flags = (flag_of(cls, f.name), *aliases_of(cls, f.name))
            _add_boolean(groups.get(f.name, parser), flags, f.name, help_text)
            continue
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text,
                                   "type": kind.parse}
        if _required(f) and not (env_prefix and f.metadata["env"]):
            options["required"] = True  # no default and no variable that could give it
        if kind.choices:
            options["choices"] = kind.choices
        else:
            options["metavar"] = f.metadata["metavar"] or (
                f.name.upper().removesuffix("S") if kind.repeat else f.name.upper())
        if kind.repeat:
            options["action"] = "append"
        groups.get(f.name, parser).add_argument(flag_of(cls, f.name),
                                                *aliases_of(cls, f.name), **options)


def _bool_value(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_boolean(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                 flags: tuple[str, ...], dest: str, help_text: str) -> None:
    """``--x`` (true), ``--x=VALUE`` / ``--x VALUE`` (Triton's form) and ``--no-x`` (false)."""
    parser.add_argument(*flags, dest=dest, default=None, nargs="?", const=True,
                        type=_bool_value, metavar="BOOL",
                        help=f"{help_text}; --{flags[0].lstrip('-')}=false or "
                             f"--no-{flags[0].lstrip('-')} turns it off")
    parser.add_argument(*("--no-" + f.lstrip("-") for f in flags), dest=dest,
                        action="store_const", const=False, default=None,
                        help=argparse.SUPPRESS)


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is _MISSING and f.default_factory is _MISSING


def build_options(cls: type[T], flags: Mapping[str, Any], environ: Mapping[str, str] = {},
                  *, env_prefix: str = "", **fixed: Any) -> T:
    """An instance of ``cls`` from parsed flags (None = not given) over variables over defaults.

    ``fixed`` sets fields that are no options (or overrides). Raises
    :class:`~cnnserve.common.errors.CnnserveError` naming the variable for a value that
    does not parse or is not one of the choices; the class's own checks raise theirs.
    """
    values: dict[str, Any] = {}
    for f in option_fields(cls):
        kind = _kind(cls, f.name)
        given = flags.get(f.name)
        if given is not None:
            values[f.name] = tuple(given) if kind.repeat else given
        elif env_prefix and f.metadata["env"] and env_of(cls, f.name, env_prefix) in environ:
            name = env_of(cls, f.name, env_prefix)
            values[f.name] = _parse_env(kind, name, environ[name])
    values.update(fixed)
    return cls(**values)


def _parse_env(kind: _Kind, name: str, text: str) -> Any:
    try:
        if kind.repeat:
            return tuple(kind.parse(p.strip()) for p in text.split(",") if p.strip())
        value = kind.parse(text)
    except ValueError as exc:
        raise CnnserveError(f"{name}={text!r}: {exc}") from exc
    if kind.choices and value not in kind.choices:
        raise CnnserveError(f"{name}={text!r}: must be one of "
                            f"{', '.join(map(str, kind.choices))}")
    return value


def parse_bool(text: str) -> bool:
    """``1/0``, ``true/false``, ``yes/no``, ``on/off`` (any case); raises ValueError else."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
