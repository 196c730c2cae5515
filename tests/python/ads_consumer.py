#!/usr/bin/env python3
"""A consumer that subscribes over ADS before the provider publishes, on one channel.

Usage: ads_consumer.py HOST:PORT

Uses the Envoy discovery protos from PyPI's xds-protos. On ONE grpc channel it opens a
State-of-the-World ADS stream for `type.googleapis.com/pixiu.pkg.metadata.Metadata` named
`greeter/rev1` before that revision exists, receives the empty first response and ACKs it, then
publishes `greeter/rev1` with the seed's MetadataService.Publish on the same channel and
checks that the content is pushed. The pushed resource is decoded with classes compiled from
the repository's proto/pixiu/pkg/metadata/metadata.proto. Exits non-zero at the first failure.
"""

import queue
import sys
import threading

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

import protogen

METADATA_TYPE_URL = "type.googleapis.com/pixiu.pkg.metadata.Metadata"
NAME = "greeter/rev1"
TIMEOUT = 10


class AdsStream:
    """A SotW ADS stream driven by a request queue, with responses read on a thread."""

    def __init__(self, channel):
        self._requests = queue.Queue()
        self._responses = queue.Queue()
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            channel
        ).StreamAggregatedResources(self._request_iter())
        threading.Thread(target=self._read, daemon=True).start()

    def _request_iter(self):
        while True:
            request = self._requests.get()
            if request is None:
                return
            yield request

    def _read(self):
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(EOFError("the server closed the ADS stream"))
        except grpc.RpcError as error:
            self._responses.put(error)

    def send(self, request):
        self._requests.put(request)

    def recv(self, timeout=TIMEOUT):
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise SystemExit(f"FAIL [ads_consumer]: no ADS response within {timeout}s")
        if isinstance(item, Exception):
            raise SystemExit(f"FAIL [ads_consumer]: ADS stream failed: {item}")
        return item

    def expect_silence(self, seconds):
        try:
            item = self._responses.get(timeout=seconds)
        except queue.Empty:
            return True
        raise SystemExit(f"FAIL [ads_consumer]: expected no response, got {item}")

    def ack(self, response, names):
        self.send(
            discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                resource_names=names,
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )

    def close(self):
        self._requests.put(None)
        self._call.cancel()


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: ads_consumer.py HOST:PORT")
    addr = sys.argv[1]
    check = protogen.Checks("ads_consumer")
    seed, seed_grpc = protogen.stubs(protogen.SEED_PROTO_ROOT, protogen.SEED_PROTO)
    (Metadata,) = protogen.message_classes(
        protogen.OUR_PROTO_ROOT, protogen.OUR_PROTO, ["pixiu.pkg.metadata.Metadata"]
    )

    channel = grpc.insecure_channel(addr)
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        raise SystemExit(f"FAIL [ads_consumer]: cannot connect to {addr} within {TIMEOUT}s")

    node = base_pb2.Node(id="python-ads-consumer", cluster="interop")
    stream = AdsStream(channel)
    stream.send(
        discovery_pb2.DiscoveryRequest(
            node=node, type_url=METADATA_TYPE_URL, resource_names=[NAME]
        )
    )
    first = stream.recv()
    check.equal(first.type_url, METADATA_TYPE_URL, "the first response has the metadata type")
    check.equal(len(first.resources), 0, f"{NAME} does not exist yet: the first response is empty")
    check.ok(first.nonce != "", "the first response carries a nonce")
    stream.ack(first, [NAME])
    stream.expect_silence(0.3)
    check.ok(True, "an ACK is not answered")

    # The provider publishes on the same channel, with the seed's Publish.
    info = '{"app":"greeter","revision":"rev1","services":{"greet/org.apache.dubbo.Greeter:1.0.0:tri":{"name":"org.apache.dubbo.Greeter","protocol":"tri","params":{"说明":"问候"}}}}'
    seed_grpc.MetadataServiceStub(channel).Publish(
        seed.PublishMetadataRequest(
            application_name="greeter", revision="rev1", metadata_info=info
        ),
        timeout=TIMEOUT,
    )
    check.ok(True, "published greeter/rev1 on the same channel")

    push = stream.recv()
    check.equal(push.type_url, METADATA_TYPE_URL, "the push has the metadata type")
    check.equal(len(push.resources), 1, "the push carries one resource")
    check.ok(push.version_info != first.version_info, "the push has a new version")
    check.ok(push.nonce != first.nonce, "the push has a new nonce")
    resource = push.resources[0]
    check.equal(resource.type_url, METADATA_TYPE_URL, "the resource is a pixiu.pkg.metadata.Metadata")
    metadata = Metadata()
    metadata.ParseFromString(resource.value)
    check.equal(metadata.application_name, "greeter", "pushed application_name")
    check.equal(metadata.revision, "rev1", "pushed revision")
    check.equal(metadata.metadata_info, info, "pushed metadata_info is the published content")
    check.equal(metadata.namespace, "default", "pushed namespace is the server's default")
    stream.ack(push, [NAME])
    stream.expect_silence(0.3)
    check.ok(True, "the ACK of the push is not answered")

    stream.close()
    channel.close()
    check.summary()


if __name__ == "__main__":
    main()
