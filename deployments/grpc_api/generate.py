"""Generate the gRPC stubs with grpcio-tools' bundled protoc (0.2 s per .proto): ``elasticlm.proto`` (ours)
and ``tei.proto`` (text-embeddings-inference's contract, served beside ours)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTOS = (ROOT / "proto" / "elasticlm.proto", ROOT / "proto" / "tei.proto")


def outputs(proto: Path) -> tuple[Path, Path]:
    return HERE / f"{proto.stem}_pb2.py", HERE / f"{proto.stem}_pb2_grpc.py"


def is_stale(proto: Path) -> bool:
    return any(not p.exists() or p.stat().st_mtime < proto.stat().st_mtime for p in outputs(proto))


def generate(protos=PROTOS) -> None:
    from grpc_tools import protoc

    # map proto/ onto this package's path, so the stubs import each other (and pickle) by full name
    virtual = HERE.relative_to(ROOT).as_posix()
    for proto in protos:
        with tempfile.TemporaryDirectory() as tmp:
            rc = protoc.main(["protoc", f"-I{virtual}={proto.parent}", f"--python_out={tmp}",
                              f"--grpc_python_out={tmp}", f"{virtual}/{proto.name}"])
            if rc != 0:
                raise RuntimeError(f"protoc failed ({rc}) on {proto}")
            for out in outputs(proto):
                staged = out.with_suffix(f".{os.getpid()}.tmp")
                staged.write_text((Path(tmp) / virtual / out.name).read_text())
                staged.replace(out)  # atomic: concurrent importers never see half a file


def ensure_generated() -> None:
    stale = [proto for proto in PROTOS if is_stale(proto)]
    if stale:
        generate(stale)


if __name__ == "__main__":
    generate()
    print("generated", *(out for proto in PROTOS for out in outputs(proto)))
