"""Regenerate pals_daemon/api/ from proto/pals/v1/pals.proto (run after every change to the .proto).

The generated modules import each other by the proto's package path (``from pals.v1 import pals_pb2``);
that path is rewritten to a relative import so the code lives inside the pals_daemon package.
`python scripts/gen_proto.py --check` exits 1 when the checked-in code is stale (tests run it).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = PROTO_ROOT / "pals" / "v1" / "pals.proto"
OUT_DIR = ROOT / "pals_daemon" / "api"
GENERATED = ("pals_pb2.py", "pals_pb2.pyi", "pals_pb2_grpc.py")


def generate(into: pathlib.Path) -> None:
    """Run protoc (from grpcio-tools) into ``into`` and fix the imports."""
    from grpc_tools import protoc  # dev dependency only

    with tempfile.TemporaryDirectory() as raw:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            str(PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for name in GENERATED:
            text = (pathlib.Path(raw) / "pals" / "v1" / name).read_text()
            text = text.replace("from pals.v1 import pals_pb2", "from . import pals_pb2")
            (into / name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    args = parser.parse_args()
    if not args.check:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        generate(pathlib.Path(fresh))
        stale = [n for n in GENERATED if (pathlib.Path(fresh) / n).read_text() != (OUT_DIR / n).read_text()]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python scripts/gen_proto.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
