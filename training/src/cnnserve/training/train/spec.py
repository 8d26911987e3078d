"""The architecture spec language: a CNN described in one line of text.

A spec is a chain of layers joined by ``->``, following the pattern
``INPUT -> [[CONV -> RELU]*N -> POOL?]*M -> [FC -> RELU]*K -> FC``::

    conv(6, 5) -> relu -> maxpool(2) -> conv(16, 5) -> relu -> maxpool(2)
      -> fc(120) -> relu -> fc(84) -> relu -> fc(10)

Layers (arguments positional or by name; sizes in pixels):

    input / input(CxHxW)         optional first item; with a shape it must match the data
    conv(out, k, stride=1, pad=0) 2-D convolution, ``out`` channels, k x k kernel
    maxpool(k, stride=k, pad=0)   max pooling;  avgpool(...) average pooling
    bn                            batch normalisation (2-D after conv, 1-D after fc)
    relu | tanh | sigmoid         activations
    dropout(p=0.5)                dropout with drop probability p
    flatten                       optional: inserted automatically before the first fc
    res(out, stride=1)            residual basic block (He et al.): conv3x3(stride) -> bn
                                  -> relu -> conv3x3 -> bn, plus the input (through a 1x1
                                  conv + bn projection when channels or size change), relu
    gap                           global average pooling: C x H x W -> C
    fc(n)                         fully connected layer with n outputs

``[ ... ]*N`` repeats a group N times, e.g. ``[conv(32, 3, pad=1) -> relu]*2 -> maxpool(2)``
or ``[res(32)]*3``.
Whitespace and newlines are free; ``#`` starts a comment (handy in ``@file`` specs). The
last layer must be ``fc(n)`` with n = number of classes; the network outputs logits.

Feature-map sizes follow ``(W - F + 2P)/S + 1`` per axis. A convolution whose windows would
never reach some input pixels (a fractional size that the padding does not absorb), or any
layer that shrinks the map below 1x1, is rejected before training, listing the computed size
after every layer. Otherwise sizes round down, as in PyTorch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnnserve.common.errors import CnnserveError

PRESETS: dict[str, str] = {
    "lenet5": ("conv(6, 5) -> relu -> maxpool(2) -> conv(16, 5) -> relu -> maxpool(2)"
               " -> fc(120) -> relu -> fc(84) -> relu -> fc(10)"),
    "fashion-cnn": ("conv(16, 5, pad=2) -> bn -> relu -> maxpool(2)"
                    " -> conv(32, 5, pad=2) -> bn -> relu -> maxpool(2) -> fc(10)"),
    # The CIFAR ResNets of He et al. (2015), section 4.2: 6n+2 layers, n=3 and n=1, with
    # projection shortcuts where the shape changes (their option B).
    "resnet20": ("conv(16, 3, pad=1) -> bn -> relu -> [res(16)]*3"
                 " -> res(32, stride=2) -> [res(32)]*2 -> res(64, stride=2) -> [res(64)]*2"
                 " -> gap -> fc(10)"),
    "resnet8": ("conv(16, 3, pad=1) -> bn -> relu -> res(16) -> res(32, stride=2)"
                " -> res(64, stride=2) -> gap -> fc(10)"),
}

# Parameter names of each layer kind, in positional order, with defaults (None: required).
_PARAMS: dict[str, tuple[tuple[str, float | None], ...]] = {
    "conv": (("out", None), ("k", None), ("stride", 1), ("pad", 0)),
    "maxpool": (("k", None), ("stride", 0), ("pad", 0)),
    "avgpool": (("k", None), ("stride", 0), ("pad", 0)),
    "fc": (("out", None),),
    "res": (("out", None), ("stride", 1)),
    "gap": (),
    "dropout": (("p", 0.5),),
    "bn": (), "relu": (), "tanh": (), "sigmoid": (), "flatten": (),
}
_ALIASES = {"linear": "fc", "batchnorm": "bn", "pool": "maxpool", "kernel": "k", "s": "stride",
            "p": "pad", "padding": "pad"}
_TOKEN = re.compile(r"\s*(?:(?P<arrow>->|→)|(?P<dims>\d+(?:x\d+)+)|(?P<num>\d+(?:\.\d*)?|\.\d+)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[\[\]()*,=]))", re.ASCII)


class SpecError(CnnserveError):
    """An architecture spec that does not parse or does not fit the input."""


@dataclass(frozen=True)
class Layer:
    """One parsed layer: its kind (``conv``, ``fc``, ...) and its named arguments."""

    kind: str
    args: tuple[tuple[str, float], ...] = ()

    def arg(self, name: str) -> float:
        """The value of argument ``name`` (KeyError if the kind has no such argument)."""
        return dict(self.args)[name]

    def int_arg(self, name: str) -> int:
        """Argument ``name`` as an int."""
        return int(self.arg(name))

    def __str__(self) -> str:
        shown: list[str] = []
        for (name, value), (_, default) in zip(self.args, _PARAMS[self.kind], strict=True):
            if default is None:
                shown.append(_fmt(value))
            elif value != (self.arg("k") if name == "stride" and default == 0 else default):
                shown.append(f"{name}={_fmt(value)}")
        return f"{self.kind}({', '.join(shown)})" if shown else self.kind


@dataclass(frozen=True)
class InputLayer(Layer):
    """The optional leading ``input`` / ``input(CxHxW)``; shape () means "from the data"."""

    shape: tuple[int, ...] = ()

    def __str__(self) -> str:
        return "input" if not self.shape else "input(" + "x".join(map(str, self.shape)) + ")"


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    # Comments end at the newline; blank them out so positions stay right.
    text = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text)
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            bad = text[pos:].lstrip()
            start = len(text) - len(bad)
            raise SpecError(f"unexpected character {bad[0]!r} at column {start + 1} near "
                            f"'{bad[:20]}'")
        toks.append(_Tok(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup)))
        pos = m.end()
    return toks


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def fail(self, what: str, tok: _Tok | None = None) -> SpecError:
        tok = tok if tok is not None else self.peek()
        if tok is None:
            return SpecError(f"{what} at the end of the spec")
        near = self.text[tok.pos:tok.pos + 24].split("->")[0].strip() or tok.text
        return SpecError(f"{what} at column {tok.pos + 1}: '{near}'")

    def expect(self, text: str) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise self.fail(f"expected '{text}'")
        if tok.text != text:
            raise self.fail(f"expected '{text}' but found '{tok.text}'")
        self.i += 1
        return tok

    def sequence(self, depth: int = 0) -> list[Layer]:
        layers = self.item(depth)
        while (tok := self.peek()) is not None and tok.kind == "arrow":
            self.i += 1
            layers += self.item(depth)
        return layers

    def item(self, depth: int) -> list[Layer]:
        tok = self.peek()
        if tok is not None and tok.text == "[":
            self.i += 1
            group = self.sequence(depth + 1)
            self.expect("]")
            times = 1
            if (star := self.peek()) is not None and star.text == "*":
                self.i += 1
                count = self.peek()
                if count is None or count.kind != "num" or not count.text.isdigit() \
                        or int(count.text) < 1:
                    raise self.fail("'*' must be followed by a positive whole number", count)
                self.i += 1
                times = int(count.text)
            return group * times
        return [self.layer()]

    def layer(self) -> Layer:
        tok = self.peek()
        if tok is None or tok.kind != "name":
            raise self.fail("expected a layer name (conv, maxpool, fc, relu, ...)")
        self.i += 1
        kind = _ALIASES.get(tok.text.lower(), tok.text.lower())
        if kind == "input":
            return self.input_layer()
        if kind not in _PARAMS:
            raise self.fail(f"unknown layer '{tok.text}' (known: {', '.join(_PARAMS)})", tok)
        given = self.arguments(tok) if (p := self.peek()) is not None and p.text == "(" else []
        return _bind(kind, given, lambda msg: self.fail(msg, tok))

    def input_layer(self) -> InputLayer:
        if (p := self.peek()) is None or p.text != "(":
            return InputLayer("input")
        self.i += 1
        dims = self.peek()
        if dims is None or dims.kind != "dims" or dims.text.count("x") != 2:
            raise self.fail("input shape must be written CxHxW, e.g. input(1x28x28)", dims)
        self.i += 1
        self.expect(")")
        return InputLayer("input", shape=tuple(int(v) for v in dims.text.split("x")))

    def arguments(self, layer_tok: _Tok) -> list[tuple[str | None, float]]:
        self.expect("(")
        given: list[tuple[str | None, float]] = []
        while (tok := self.peek()) is not None and tok.text != ")":
            name = None
            if tok.kind == "name":
                name = tok.text.lower()
                self.i += 1
                self.expect("=")
                tok = self.peek()
            if tok is None or tok.kind != "num":
                raise self.fail(f"'{layer_tok.text}' argument must be a number", tok)
            self.i += 1
            given.append((name, float(tok.text)))
            if (sep := self.peek()) is not None and sep.text == ",":
                self.i += 1
            elif sep is None or sep.text != ")":
                raise self.fail(f"expected ',' or ')' in the arguments of '{layer_tok.text}'",
                                sep)
        self.expect(")")
        return given


def _bind(kind: str, given: list[tuple[str | None, float]],
          fail: Callable[[str], SpecError]) -> Layer:
    """Match positional/named arguments to ``_PARAMS[kind]`` and check their ranges."""
    params = _PARAMS[kind]
    names = [n for n, _ in params]
    values: dict[str, float] = {}
    for index, (name, value) in enumerate(given):
        if name is None:
            if index >= len(names):
                raise fail(f"'{kind}' takes at most {len(names)} arguments ({', '.join(names)})")
            name = names[index]
        if name not in names:
            name = _ALIASES.get(name, name)
        if name not in names:
            raise fail(f"'{kind}' has no argument '{name}' (it takes {', '.join(names) or 'none'})")
        values[name] = value
    for name, default in params:
        if name not in values:
            if default is None:
                raise fail(f"'{kind}' needs argument '{name}' ({kind}({', '.join(names)}))")
            values[name] = float(default)
    if kind in ("maxpool", "avgpool") and values["stride"] == 0:
        values["stride"] = values["k"]  # pooling windows tile the map by default
    for name, value in values.items():
        if name == "p":
            if not 0.0 <= value < 1.0:
                raise fail(f"dropout probability must be in [0, 1), got {_fmt(value)}")
        elif not value.is_integer() or value < (0 if name == "pad" else 1):
            raise fail(f"'{kind}' argument '{name}' must be a whole number "
                       f"{'>= 0' if name == 'pad' else '>= 1'}, got {_fmt(value)}")
    return Layer(kind, tuple((n, values[n]) for n in names))


def parse_spec(text: str) -> list[Layer]:
    """Parse spec ``text`` into a flat list of layers (groups expanded).

    Raises :class:`SpecError` naming the bad token and its column, or the structural rule
    broken (conv after fc, no final fc, ...).
    """
    if not text.strip():
        raise SpecError("the architecture spec is empty")
    parser = _Parser(text)
    layers = parser.sequence()
    if parser.peek() is not None:
        raise parser.fail("expected '->' between layers")
    _check_structure(layers)
    return layers


def _check_structure(layers: list[Layer]) -> None:
    for i, layer in enumerate(layers):
        if isinstance(layer, InputLayer) and i > 0:
            raise SpecError(f"'input' may only be the first item (it is item {i + 1})")
    flat = ("fc", "flatten", "gap")
    seen_fc = next((i for i, layer in enumerate(layers) if layer.kind in flat), None)
    if seen_fc is not None:
        for layer in layers[seen_fc + 1:]:
            if layer.kind in ("conv", "maxpool", "avgpool", "res", *flat[1:]):
                raise SpecError(f"'{layer}' cannot follow a flatten/gap/fc layer: convolutions,"
                                " residual blocks and pooling come before the fully connected "
                                "part")
    if not layers or layers[-1].kind != "fc":
        last = layers[-1] if layers else "nothing"
        raise SpecError(f"the spec must end with fc(N), the classifier layer; it ends with "
                        f"'{last}'")


def with_classes(layers: list[Layer], num_classes: int) -> list[Layer]:
    """``layers`` with the final ``fc`` giving ``num_classes`` outputs (for presets, which are
    written for 10 classes, used on a dataset with another number)."""
    return [*layers[:-1], Layer("fc", (("out", float(num_classes)),))]


def format_spec(layers: list[Layer]) -> str:
    """Canonical text of ``layers`` (parses back to the same list)."""
    return " -> ".join(str(layer) for layer in layers)


def resolve_arch(arch: str) -> tuple[str, str]:
    """Turn ``--arch`` (preset name, spec text or ``@file``) into ``(name, spec text)``.

    The name is the preset name, the file name, or "custom". Raises :class:`SpecError` for an
    unreadable file or a word that is neither a preset nor a spec.
    """
    if arch in PRESETS:
        return arch, PRESETS[arch]
    if arch.startswith("@"):
        path = Path(arch[1:]).expanduser()
        try:
            return path.stem, path.read_text()
        except OSError as exc:
            raise SpecError(f"cannot read architecture file {path}: {exc.strerror}") from exc
    if re.fullmatch(r"[A-Za-z0-9_-]+", arch) and arch.lower() not in _PARAMS:
        raise SpecError(f"unknown architecture '{arch}': use a preset "
                        f"({', '.join(PRESETS)}), a spec such as 'conv(8, 3) -> relu -> fc(10)'"
                        ", or @FILE")
    return "custom", arch
