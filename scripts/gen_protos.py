#!/usr/bin/env python3
"""Generate the Python protobuf/gRPC stubs and their typing stubs from proto/*.proto.

Usage: ``scripts/gen_protos.py [--out DIR]`` (default: proto/src/cnnserve/proto/, the package
``cnnserve.proto``). The .proto files are copied into a temporary tree at
``cnnserve/proto/`` so that protoc names them by their import path and the generated code
imports ``from cnnserve.proto import model_config_pb2`` with no post-processing. Needs
grpcio-tools and mypy-protobuf (``protoc-gen-mypy`` next to this Python). The outputs are
committed; tests/test_proto_stubs.py regenerates them and fails on any difference.
Exit status 0 on success, 1 if protoc fails (its message is printed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "src" / "cnnserve" / "proto"
PACKAGE_PATH = Path("cnnserve") / "proto"
MESSAGE_SUFFIXES = ("_pb2.py", "_pb2.pyi")
SERVICE_SUFFIXES = ("_pb2_grpc.py", "_pb2_grpc.pyi")
_SERVICE = re.compile(r"^service\s", re.MULTILINE)


def _plugin(name: str) -> str:
    """Path of a protoc plugin installed next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"gen_protos: {name} not found; install mypy-protobuf")
    return found


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Generate the stubs of every .proto in ``proto_dir`` into ``out_dir``; return their paths."""
    from grpc_tools import protoc  # grpcio-tools: a dev dependency, imported only here

    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise SystemExit(f"gen_protos: no .proto files in {proto_dir}")
    with tempfile.TemporaryDirectory(prefix="cnnserve-protos-") as tmp:
        tree = Path(tmp)
        package = tree / PACKAGE_PATH
        package.mkdir(parents=True)
        for proto in protos:
            shutil.copyfile(proto, package / proto.name)
        args = [
            "grpc_tools.protoc",
            f"-I{tree}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tree}",
            f"--grpc_python_out={tree}",
            f"--mypy_out={tree}",
            f"--mypy_grpc_out={tree}",
            *(str(PACKAGE_PATH / p.name) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("gen_protos: protoc failed (see its message above)")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for proto in protos:
            # protoc writes a *_pb2_grpc module even for a file without services; it would
            # only be an empty module to commit and keep in sync.
            has_service = _SERVICE.search(proto.read_text(encoding="utf-8")) is not None
            suffixes = MESSAGE_SUFFIXES + (SERVICE_SUFFIXES if has_service else ())
            for suffix in suffixes:
                name = proto.stem + suffix
                shutil.copyfile(package / name, out_dir / name)
                written.append(out_dir / name)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR,
                        help="folder for the generated files (default: proto/src/cnnserve/proto/)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
