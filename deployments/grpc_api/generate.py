"""Generate the gRPC stubs with grpcio-tools' bundled protoc (0.2 s)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = ROOT / "proto" / "elasticlm.proto"
OUTPUTS = (HERE / "elasticlm_pb2.py", HERE / "elasticlm_pb2_grpc.py")


def is_stale() -> bool:
    return any(not p.exists() or p.stat().st_mtime < PROTO.stat().st_mtime for p in OUTPUTS)


def generate() -> None:
    from grpc_tools import protoc

    # map proto/ onto this package's path, so the stubs import each other (and pickle) by full name
    virtual = HERE.relative_to(ROOT).as_posix()
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{virtual}={PROTO.parent}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                          f"{virtual}/{PROTO.name}"])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
        for out in OUTPUTS:
            staged = out.with_suffix(f".{os.getpid()}.tmp")
            staged.write_text((Path(tmp) / virtual / out.name).read_text())
            staged.replace(out)  # atomic: concurrent importers never see half a file


def ensure_generated() -> None:
    if is_stale():
        generate()


if __name__ == "__main__":
    generate()
    print("generated", *OUTPUTS)
