#!/usr/bin/env python3
"""A Dubbo-style provider in Python: publishes its application metadata, then registers
itself as the provider of its interfaces, and refreshes both until it stops.

    python examples/python/provider.py 127.0.0.1:15010 --application greeter \
        --revision rev-1 --interface org.example.Greeter --run-for 60

Needs grpcio and grpcio-tools (tests/python/requirements.txt).
"""

import argparse
import json
import time

import grpc

import stubs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", help="HOST:PORT of pixiu-metadata")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--application", default="greeter")
    parser.add_argument("--revision", default="rev-1")
    parser.add_argument("--interface", action="append", dest="interfaces")
    parser.add_argument("--run-for", type=float, default=0, help="seconds to keep refreshing")
    parser.add_argument("--refresh-every", type=float, default=10)
    args = parser.parse_args()
    interfaces = args.interfaces or ["org.example.Greeter"]
    metadata_pb2, metadata_grpc, mapping_pb2, mapping_grpc = stubs.load()

    channel = grpc.insecure_channel(args.server)
    grpc.channel_ready_future(channel).result(timeout=10)
    metadata = metadata_grpc.MetadataServiceStub(channel)
    mappings = mapping_grpc.ServiceMappingServiceStub(channel)
    headers = stubs.call_metadata(args.namespace)
    info = json.dumps(
        {
            "app": args.application,
            "revision": args.revision,
            "services": {
                f"{i}:1.0.0:tri": {"name": i, "version": "1.0.0", "protocol": "tri"}
                for i in interfaces
            },
        }
    )

    def publish():
        # Metadata first, then the mapping: a consumer that learns of the application can
        # find its metadata.
        metadata.Publish(
            metadata_pb2.PublishMetadataRequest(
                application_name=args.application,
                revision=args.revision,
                metadata_info=info,
            ),
            metadata=headers,
            timeout=10,
        )
        for interface in interfaces:
            mappings.Register(
                mapping_pb2.RegisterServiceMappingRequest(
                    interface=interface, application_name=args.application
                ),
                metadata=headers,
                timeout=10,
            )

    publish()
    print(f"published {args.application}/{args.revision}", flush=True)
    for interface in interfaces:
        print(f"registered {interface} -> {args.application}", flush=True)
    deadline = time.monotonic() + args.run_for
    while time.monotonic() < deadline:
        time.sleep(min(args.refresh_every, max(0, deadline - time.monotonic())))
        publish()
    channel.close()


if __name__ == "__main__":
    main()
