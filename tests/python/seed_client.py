#!/usr/bin/env python3
"""A client generated from the seed's proto text, run against pixiu-metadata.

Usage: seed_client.py HOST:PORT

The stubs come from seed/pixiu/pkg/metadata/seed.proto, the services of dubbo-go-pixiu issue
#484 with their original field names (`identitfier`, `serivce_definition`); they are generated
at run time by grpcio-tools. Checks that values round-trip byte for byte (non-ASCII, ~900 KB,
a 128-character SHA-512 revision), that a revision collision overwrites, the NOT_FOUND and
INVALID_ARGUMENT status codes, and that the `x-pixiu-namespace` header isolates namespaces.
Exits non-zero with a message at the first failure.
"""

import hashlib
import json
import sys

import grpc

import protogen

NAMESPACE_HEADER = "x-pixiu-namespace"


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: seed_client.py HOST:PORT")
    addr = sys.argv[1]
    seed, seed_grpc = protogen.stubs(protogen.SEED_PROTO_ROOT, protogen.SEED_PROTO)
    check = protogen.Checks("seed_client")

    max_size = 8 * 1024 * 1024
    channel = grpc.insecure_channel(
        addr,
        options=[
            ("grpc.max_send_message_length", max_size),
            ("grpc.max_receive_message_length", max_size),
        ],
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        raise SystemExit(f"FAIL [seed_client]: cannot connect to {addr} within 10s")
    metadata = seed_grpc.MetadataServiceStub(channel)
    definitions = seed_grpc.ServiceDefinitionServiceStub(channel)

    def expect_code(call, request, code, what, **kwargs):
        try:
            call(request, timeout=10, **kwargs)
        except grpc.RpcError as error:
            check.equal(error.code(), code, what)
            return error
        raise SystemExit(f"FAIL [seed_client]: {what}: succeeded, want {code}")

    # Application metadata: a Dubbo MetadataInfo with non-ASCII text, under the MD5 revision
    # a Java provider would compute.
    info = json.dumps(
        {
            "app": "greeter-app",
            "revision": "",
            "services": {
                "greet/org.apache.dubbo.Greeter:1.0.0:tri": {
                    "name": "org.apache.dubbo.Greeter",
                    "group": "greet",
                    "version": "1.0.0",
                    "protocol": "tri",
                    "path": "org.apache.dubbo.Greeter",
                    "params": {"description": "问候服务 — Grüße 👋", "timeout": "3000"},
                }
            },
        },
        ensure_ascii=False,
    )
    revision = hashlib.md5(info.encode()).hexdigest()
    metadata.Publish(
        seed.PublishMetadataRequest(
            application_name="greeter-app", revision=revision, metadata_info=info
        ),
        timeout=10,
    )
    got = metadata.Get(
        seed.GetMetadataRequest(application_name="greeter-app", revision=revision),
        timeout=10,
    )
    check.equal(got.metadata_info, info, "metadata with non-ASCII text round-trips")
    check.equal(
        got.metadata_info.encode("utf-8"),
        info.encode("utf-8"),
        "metadata round-trips byte for byte",
    )

    # dubbo-go's SHA-512 revision (128 hex characters) and a ~900 KB value.
    big = ("ключ=значение;键=值;" * 64 + "\n") * 400
    big_revision = hashlib.sha512(big.encode()).hexdigest()
    check.equal(len(big_revision), 128, "a SHA-512 revision is 128 characters")
    size = len(big.encode())
    check.ok(800_000 < size < 1_000_000, f"the large value is ~900 KB ({size} bytes)")
    metadata.Publish(
        seed.PublishMetadataRequest(
            application_name="big-app", revision=big_revision, metadata_info=big
        ),
        timeout=30,
    )
    got = metadata.Get(
        seed.GetMetadataRequest(application_name="big-app", revision=big_revision),
        timeout=30,
    )
    check.equal(got.metadata_info, big, f"a {size}-byte value round-trips exactly")

    # The same revision with different content overwrites (the seed's rule).
    metadata.Publish(
        seed.PublishMetadataRequest(
            application_name="greeter-app", revision=revision, metadata_info="collided"
        ),
        timeout=10,
    )
    got = metadata.Get(
        seed.GetMetadataRequest(application_name="greeter-app", revision=revision),
        timeout=10,
    )
    check.equal(got.metadata_info, "collided", "a revision collision overwrites")

    # Service definitions, with the seed's misspelled field names.
    identifier = "org.apache.dubbo.Greeter:1.0.0:greet:provider:greeter-app"
    definition = json.dumps(
        {
            "canonicalName": "org.apache.dubbo.Greeter",
            "codeSource": "file:/app/greeter.jar",
            "methods": [
                {
                    "name": "greet",
                    "parameterTypes": ["java.lang.String"],
                    "returnType": "java.lang.String",
                    "annotations": ["@Doc(\"说你好\")"],
                }
            ],
            "types": [{"type": "java.lang.String"}],
        },
        ensure_ascii=False,
    )
    definitions.Publish(
        seed.PublishServiceDefinitionRequest(
            identitfier=identifier, serivce_definition=definition
        ),
        timeout=10,
    )
    got = definitions.Get(
        seed.GetServiceDefinitionRequest(identitfier=identifier), timeout=10
    )
    check.equal(got.serivce_definition, definition, "a service definition round-trips")
    # Parts of a Dubbo MetadataIdentifier may be empty.
    sparse = "org.apache.dubbo.Echo:::provider:"
    definitions.Publish(
        seed.PublishServiceDefinitionRequest(identitfier=sparse, serivce_definition="{}"),
        timeout=10,
    )
    got = definitions.Get(seed.GetServiceDefinitionRequest(identitfier=sparse), timeout=10)
    check.equal(got.serivce_definition, "{}", "an identifier with empty parts works")

    # Status codes.
    expect_code(
        metadata.Get,
        seed.GetMetadataRequest(application_name="greeter-app", revision="missing"),
        grpc.StatusCode.NOT_FOUND,
        "a missing revision is NOT_FOUND",
    )
    expect_code(
        metadata.Get,
        seed.GetMetadataRequest(application_name="nobody", revision=revision),
        grpc.StatusCode.NOT_FOUND,
        "a missing application is NOT_FOUND",
    )
    expect_code(
        definitions.Get,
        seed.GetServiceDefinitionRequest(identitfier="org.example.Missing:1.0.0"),
        grpc.StatusCode.NOT_FOUND,
        "a missing definition is NOT_FOUND",
    )
    expect_code(
        metadata.Publish,
        seed.PublishMetadataRequest(
            application_name="", revision="r", metadata_info="v"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "an empty application name is INVALID_ARGUMENT",
    )
    expect_code(
        metadata.Publish,
        seed.PublishMetadataRequest(
            application_name="app", revision="", metadata_info="v"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "an empty revision is INVALID_ARGUMENT",
    )
    expect_code(
        metadata.Get,
        seed.GetMetadataRequest(application_name="", revision="r"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "a Get with an empty application name is INVALID_ARGUMENT",
    )
    expect_code(
        definitions.Publish,
        seed.PublishServiceDefinitionRequest(identitfier="", serivce_definition="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "an empty identifier is INVALID_ARGUMENT",
    )
    expect_code(
        metadata.Publish,
        seed.PublishMetadataRequest(
            application_name="app", revision="r", metadata_info="v"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "a malformed namespace header is INVALID_ARGUMENT",
        metadata=((NAMESPACE_HEADER, "a/b"),),
    )

    # Namespaces, chosen with the x-pixiu-namespace header, are isolated.
    for namespace in ("team-a", "team-b"):
        metadata.Publish(
            seed.PublishMetadataRequest(
                application_name="shared-app",
                revision="r1",
                metadata_info=f"in {namespace}",
            ),
            metadata=((NAMESPACE_HEADER, namespace),),
            timeout=10,
        )
        definitions.Publish(
            seed.PublishServiceDefinitionRequest(
                identitfier="org.example.Shared", serivce_definition=f"def in {namespace}"
            ),
            metadata=((NAMESPACE_HEADER, namespace),),
            timeout=10,
        )
    for namespace in ("team-a", "team-b"):
        got = metadata.Get(
            seed.GetMetadataRequest(application_name="shared-app", revision="r1"),
            metadata=((NAMESPACE_HEADER, namespace),),
            timeout=10,
        )
        check.equal(got.metadata_info, f"in {namespace}", f"{namespace} reads its own metadata")
        got = definitions.Get(
            seed.GetServiceDefinitionRequest(identitfier="org.example.Shared"),
            metadata=((NAMESPACE_HEADER, namespace),),
            timeout=10,
        )
        check.equal(
            got.serivce_definition, f"def in {namespace}", f"{namespace} reads its own definition"
        )
    expect_code(
        metadata.Get,
        seed.GetMetadataRequest(application_name="shared-app", revision="r1"),
        grpc.StatusCode.NOT_FOUND,
        "the default namespace does not see team-a's or team-b's metadata",
    )
    expect_code(
        definitions.Get,
        seed.GetServiceDefinitionRequest(identitfier="org.example.Shared"),
        grpc.StatusCode.NOT_FOUND,
        "the default namespace does not see team-a's or team-b's definitions",
    )
    expect_code(
        metadata.Get,
        seed.GetMetadataRequest(application_name="greeter-app", revision=revision),
        grpc.StatusCode.NOT_FOUND,
        "team-a does not see the default namespace's metadata",
        metadata=((NAMESPACE_HEADER, "team-a"),),
    )

    channel.close()
    check.summary()


if __name__ == "__main__":
    main()
