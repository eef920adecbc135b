"""The gRPC messages, compiled from v2/proto/inference.proto with grpcio-tools into
v2/generated/ (not in git). ``make install`` and the Dockerfile compile them; an import
compiles them if they are missing or older than the .proto.

    python -m v2.stubs    # compile again
"""

import os
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
PROTO = HERE / "proto" / "inference.proto"
GENERATED = HERE / "generated"
MODULES = ("inference_pb2.py", "inference_pb2.pyi")
# The messages are registered in a pool of their own, not protobuf's default one, where
# tritonclient registers its own messages of the same names: both can then live in one
# process (a test, a pipeline that calls a Triton server beside serving).
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def stale() -> bool:
    target = GENERATED / MODULES[0]
    return not target.exists() or target.stat().st_mtime < PROTO.stat().st_mtime


def build() -> None:
    """Compiles the .proto; each file lands whole (a rename), so that processes
    importing at the same time never read half of one."""
    from grpc_tools import protoc

    GENERATED.mkdir(exist_ok=True)
    (GENERATED / "__init__.py").touch()
    with tempfile.TemporaryDirectory(dir=GENERATED, prefix=".build-") as scratch:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={PROTO.parent}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                str(PROTO),
            ]
        )
        if status != 0:
            raise RuntimeError(f"grpc_tools.protoc could not compile {PROTO} (status {status})")
        module = Path(scratch) / MODULES[0]
        code = module.read_text()
        if DEFAULT_POOL not in code:
            raise RuntimeError(f"grpc_tools.protoc wrote {module.name} in an unexpected form")
        module.write_text(code.replace(DEFAULT_POOL, PRIVATE_POOL))
        for name in MODULES:
            os.replace(Path(scratch) / name, GENERATED / name)


def messages() -> ModuleType:
    """The compiled module of messages, compiled first if need be."""
    if stale():
        build()
    from v2.generated import inference_pb2

    return inference_pb2


if __name__ == "__main__":
    build()
    print(f"compiled {PROTO.relative_to(HERE.parent)} into {GENERATED.relative_to(HERE.parent)}/")
