"""Generates Python code from .proto files at run time, so no generated code is committed.

Used by the interoperability scripts beside this file; needs grpcio-tools.
"""

import importlib
import os
import sys
import tempfile

from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SEED_PROTO_ROOT = os.path.join(HERE, "seed")
SEED_PROTO = "pixiu/pkg/metadata/seed.proto"
OUR_PROTO_ROOT = os.path.join(REPO, "proto")
OUR_PROTO = "pixiu/pkg/metadata/metadata.proto"


def _well_known_include():
    return os.path.join(os.path.dirname(protoc.__file__), "_proto")


def _protoc(args):
    code = protoc.main(["grpc_tools.protoc", f"-I{_well_known_include()}"] + args)
    if code != 0:
        raise SystemExit(f"FAIL: protoc {' '.join(args)} exited with {code}")


def stubs(proto_root, proto_file):
    """Generates `<name>_pb2` and `<name>_pb2_grpc` for `proto_file` into a temporary
    directory and imports them; returns (pb2, pb2_grpc)."""
    out = tempfile.mkdtemp(prefix="pixiu-stubs-")
    _protoc(
        [
            f"-I{proto_root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto_file,
        ]
    )
    sys.path.insert(0, out)
    module = proto_file[: -len(".proto")].replace("/", ".")
    return importlib.import_module(module + "_pb2"), importlib.import_module(
        module + "_pb2_grpc"
    )


def message_classes(proto_root, proto_file, names):
    """Compiles `proto_file` into a private descriptor pool and returns message classes for
    the fully qualified `names`.

    A private pool lets a script use our proto next to the seed's, which defines the same
    message names in the same package."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    out = tempfile.mkdtemp(prefix="pixiu-descriptors-")
    path = os.path.join(out, "set.pb")
    _protoc(
        [
            f"-I{proto_root}",
            f"--descriptor_set_out={path}",
            "--include_imports",
            proto_file,
        ]
    )
    files = descriptor_pb2.FileDescriptorSet()
    with open(path, "rb") as f:
        files.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return [
        message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        for name in names
    ]


class Checks:
    """Counts checks and stops at the first failure with a clear message."""

    def __init__(self, name):
        self.name = name
        self.passed = 0

    def ok(self, condition, what):
        if not condition:
            raise SystemExit(f"FAIL [{self.name}]: {what}")
        self.passed += 1
        print(f"ok   {what}", flush=True)

    def equal(self, got, want, what):
        if got != want:
            shown_got, shown_want = _shorten(got), _shorten(want)
            raise SystemExit(
                f"FAIL [{self.name}]: {what}: got {shown_got}, want {shown_want}"
            )
        self.passed += 1
        print(f"ok   {what}", flush=True)

    def summary(self):
        print(f"{self.name}: {self.passed} checks passed", flush=True)


def _shorten(value, limit=200):
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value)} long)"
