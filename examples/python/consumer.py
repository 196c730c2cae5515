#!/usr/bin/env python3
"""A Dubbo-style consumer in Python: knows an interface, learns its providers over ADS,
then their metadata, on ONE channel for both xDS and the metadata API.

    python examples/python/consumer.py 127.0.0.1:15010 --interface org.example.Greeter \
        --expect greeter/rev-1

On one grpc channel it opens an ADS stream (State of the World, Envoy's protos from PyPI's
xds-protos) and subscribes to the ServiceMapping of the interface. When providers appear it
lists their revisions with MetadataService.List on the same channel, subscribes to their
Metadata on the same ADS stream, and prints each pushed metadata. With --expect it exits 0
once every named `<application>/<revision>` was pushed (and checked with Get), non-zero on
timeout.
"""

import argparse
import queue
import sys
import threading

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

import stubs


class Ads:
    """One SotW ADS stream carrying several types, each with its own subscription."""

    def __init__(self, channel, node):
        self._requests = queue.Queue()
        self.responses = queue.Queue()
        self.names = {}
        self.node = node
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter(self._requests.get, None)
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for response in self._call:
                self.responses.put(response)
            self.responses.put(EOFError("the server closed the stream"))
        except grpc.RpcError as error:
            self.responses.put(error)

    def subscribe(self, type_url, names):
        first = type_url not in self.names
        self.names[type_url] = sorted(names)
        self._requests.put(
            discovery_pb2.DiscoveryRequest(
                node=self.node if first else None,
                type_url=type_url,
                resource_names=self.names[type_url],
            )
        )

    def ack(self, response):
        self._requests.put(
            discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                resource_names=self.names.get(response.type_url, []),
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )

    def close(self):
        self._requests.put(None)
        self._call.cancel()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", help="HOST:PORT of pixiu-metadata")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--interface", default="org.example.Greeter")
    parser.add_argument("--expect", action="append", default=[], help="<application>/<revision>")
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    metadata_pb2, metadata_grpc, mapping_pb2, _ = stubs.load()

    channel = grpc.insecure_channel(args.server)
    grpc.channel_ready_future(channel).result(timeout=10)
    metadata = metadata_grpc.MetadataServiceStub(channel)
    headers = stubs.call_metadata(args.namespace)
    node = base_pb2.Node(id="python-example-consumer")
    if args.namespace:
        node.metadata.CopyFrom(
            struct_pb2.Struct(fields={"NAMESPACE": struct_pb2.Value(string_value=args.namespace)})
        )

    ads = Ads(channel, node)
    ads.subscribe(stubs.MAPPING_TYPE_URL, [args.interface])
    print(f"subscribed to the providers of {args.interface}", flush=True)
    providers = set()
    revisions = set()
    seen = {}
    while True:
        try:
            response = ads.responses.get(timeout=args.timeout)
        except queue.Empty:
            raise SystemExit(f"FAIL: nothing pushed within {args.timeout}s; seen {sorted(seen)}")
        if isinstance(response, Exception):
            raise SystemExit(f"FAIL: ADS stream failed: {response}")
        if response.type_url == stubs.MAPPING_TYPE_URL:
            current = set()
            for any_ in response.resources:
                mapping = mapping_pb2.ServiceMapping.FromString(any_.value)
                current.update(mapping.application_names)
            ads.ack(response)
            for gone in sorted(providers - current):
                print(f"provider left: {gone}", flush=True)
            for new in sorted(current - providers):
                print(f"provider: {new}", flush=True)
                listed = metadata.List(
                    metadata_pb2.ListMetadataRequest(application_name=new, names_only=True),
                    metadata=headers,
                    timeout=10,
                )
                revisions.update(f"{r.application_name}/{r.revision}" for r in listed.records)
            providers = current
            if revisions:
                ads.subscribe(stubs.METADATA_TYPE_URL, revisions)
        elif response.type_url == stubs.METADATA_TYPE_URL:
            ads.ack(response)
            for any_ in response.resources:
                m = metadata_pb2.Metadata.FromString(any_.value)
                name = f"{m.application_name}/{m.revision}"
                if seen.get(name) != m.metadata_info:
                    seen[name] = m.metadata_info
                    print(f"metadata {name}: {m.metadata_info}", flush=True)
        if args.expect and all(name in seen for name in args.expect):
            for name in args.expect:
                application, revision = name.split("/", 1)
                got = metadata.Get(
                    metadata_pb2.GetMetadataRequest(application_name=application, revision=revision),
                    metadata=headers,
                    timeout=10,
                )
                if got.metadata_info != seen[name]:
                    raise SystemExit(f"FAIL: Get {name} differs from what was pushed")
            print(f"consumer: received {len(args.expect)} expected metadata", flush=True)
            ads.close()
            channel.close()
            return 0


if __name__ == "__main__":
    sys.exit(main())
