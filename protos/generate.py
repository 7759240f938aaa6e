"""Regenerate the Python code for the .proto files in this folder.

    python protos/generate.py              # rewrite the checked-in files next to this script
    python protos/generate.py --out DIR    # write them into DIR instead (the staleness test)

The .proto files are staged under a temporary `moefleet/protos/` tree and compiled with
that tree as the include root, so each descriptor is named `moefleet/protos/<name>.proto`
and the generated `_pb2_grpc` modules import `from moefleet.protos import <name>_pb2`,
which resolves inside the installed package with no hand edits.

The compiler is the protoc bundled with grpcio-tools, pinned to one version because it
decides the generated code: the same inputs and that version give byte-identical output.
This script knows nothing about what the messages mean.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

__all__ = ["PROTOS", "GRPCIO_TOOLS_VERSION", "generated_names", "generate"]

PROTOS = ("inference", "admin")
GRPCIO_TOOLS_VERSION = "1.73.0"
_HERE = Path(__file__).resolve().parent
_PACKAGE_DIR = Path("moefleet", "protos")


def generated_names() -> list[str]:
    """The files `generate` writes, in a fixed order."""
    suffixes = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    return [f"{name}{suffix}" for name in PROTOS for suffix in suffixes]


def generate(out_dir: Path, src_dir: Path = _HERE) -> list[Path]:
    """Compile `src_dir/<name>.proto` for each of PROTOS into `out_dir`; return the files."""
    _check_tools_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moefleet-protos-") as tmp:
        include_root, build_root = Path(tmp, "include"), Path(tmp, "build")
        sources = _stage(src_dir, include_root / _PACKAGE_DIR)
        build_root.mkdir()
        _run_protoc(include_root, build_root, sources)
        return [_copy(build_root / _PACKAGE_DIR / name, out_dir) for name in generated_names()]


def _check_tools_version() -> None:
    found = metadata.version("grpcio-tools")
    if found != GRPCIO_TOOLS_VERSION:
        sys.exit(
            f"grpcio-tools=={GRPCIO_TOOLS_VERSION} is required (found {found}): "
            "its bundled protoc decides the generated code"
        )


def _stage(src_dir: Path, package_dir: Path) -> list[str]:
    """Copy the .proto files under `package_dir`; return their include-relative names."""
    package_dir.mkdir(parents=True)
    for name in PROTOS:
        shutil.copyfile(src_dir / f"{name}.proto", package_dir / f"{name}.proto")
    return [(_PACKAGE_DIR / f"{name}.proto").as_posix() for name in PROTOS]


def _run_protoc(include_root: Path, build_root: Path, sources: list[str]) -> None:
    from grpc_tools import protoc  # only the generator needs grpcio-tools

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={include_root}",
        f"--proto_path={well_known}",
        f"--python_out={build_root}",
        f"--pyi_out={build_root}",
        f"--grpc_python_out={build_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed: {' '.join(args)}")


def _copy(src: Path, out_dir: Path) -> Path:
    dst = out_dir / src.name
    shutil.copyfile(src, dst)
    return dst


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=_HERE, help="output folder (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
