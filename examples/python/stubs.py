"""Generates Python code for pixiu-metadata's protos at run time (no generated code is kept).

The Envoy discovery protos come from PyPI's xds-protos; ours are compiled from the
repository's proto/ directory with grpcio-tools into a temporary directory.
"""

import importlib
import os
import sys
import tempfile

from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "proto")
PROTOS = [
    "pixiu/pkg/metadata/metadata.proto",
    "pixiu/pkg/metadata/mapping.proto",
]

METADATA_TYPE_URL = "type.googleapis.com/pixiu.pkg.metadata.Metadata"
MAPPING_TYPE_URL = "type.googleapis.com/pixiu.pkg.metadata.ServiceMapping"


def load():
    """Compiles our protos and returns (metadata_pb2, metadata_pb2_grpc, mapping_pb2,
    mapping_pb2_grpc)."""
    out = tempfile.mkdtemp(prefix="pixiu-example-stubs-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
        ]
        + PROTOS
    )
    if code != 0:
        raise SystemExit(f"protoc exited with {code}")
    sys.path.insert(0, out)
    modules = []
    for proto in PROTOS:
        name = proto[: -len(".proto")].replace("/", ".")
        modules.append(importlib.import_module(name + "_pb2"))
        modules.append(importlib.import_module(name + "_pb2_grpc"))
    return tuple(modules)


def call_metadata(namespace):
    """gRPC call metadata selecting `namespace` (none: the server's default)."""
    return [("x-pixiu-namespace", namespace)] if namespace else []
