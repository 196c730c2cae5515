#!/usr/bin/env python3
"""A real gRPC xDS client (grpcio's `xds:///` resolver) against our ADS server.

Usage: xds_interop.py HOST:PORT ENVOY_CONFIG_DIR

Driven by tests/xds_interop.rs, which starts the server with `--envoy-config-dir` pointing at
ENVOY_CONFIG_DIR (empty at start). This script:
1. starts two tiny gRPC backends on 127.0.0.1:0, each answering `/pixiu.test.Echo/Who` with
   its own name;
2. writes a Listener (HttpConnectionManager api_listener with RDS over ADS and the router
   filter), a RouteConfiguration, an EDS Cluster and a ClusterLoadAssignment (with a
   weighted locality; gRPC ignores endpoints without one) pointing at backend-1;
3. writes an xDS bootstrap pointing at the server (GRPC_XDS_BOOTSTRAP) and makes an RPC to
   `xds:///greeter`, which grpcio resolves LDS -> RDS -> CDS -> EDS; it must reach backend-1;
4. rewrites only the endpoints file to backend-2 and checks the client follows;
5. checks over CSDS that the server saw this node ACK all four types.
Exits non-zero at the first failure.
"""

import json
import os
import sys
import tempfile
import time
from concurrent import futures

TARGET = "greeter"
NODE_ID = "python-xds-interop"
METHOD = "/pixiu.test.Echo/Who"
TIMEOUT = 30

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def write_atomically(path, text):
    """Writes via a hidden temporary file and rename, so the server never reads half a file."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def routing_yaml():
    # JSON is YAML: written with json.dumps to keep quoting exact.
    return json.dumps(
        {
            "resources": [
                {
                    "@type": LISTENER,
                    "name": TARGET,
                    "api_listener": {
                        "api_listener": {
                            "@type": HCM,
                            "stat_prefix": TARGET,
                            "rds": {
                                "route_config_name": "greeter-route",
                                "config_source": {"ads": {}, "resource_api_version": "V3"},
                            },
                            "http_filters": [
                                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                            ],
                        }
                    },
                },
                {
                    "@type": ROUTE,
                    "name": "greeter-route",
                    "virtual_hosts": [
                        {
                            "name": "greeter",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": ""}, "route": {"cluster": "greeter-cluster"}}],
                        }
                    ],
                },
                {
                    "@type": CLUSTER,
                    "name": "greeter-cluster",
                    "type": "EDS",
                    "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
                    "lb_policy": "ROUND_ROBIN",
                    "connect_timeout": "1s",
                },
            ]
        },
        indent=2,
    )


def endpoints_yaml(port):
    return f"""\
"@type": {ENDPOINTS}
cluster_name: greeter-cluster
endpoints:
- locality: {{ region: local, zone: zone-a }}
  load_balancing_weight: 1
  lb_endpoints:
  - endpoint:
      address:
        socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    health_status: HEALTHY
"""


def start_backend(grpc, name):
    def who(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "pixiu.test.Echo",
        {"Who": grpc.unary_unary_rpc_method_handler(who)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def who(grpc, channel):
    call = channel.unary_unary(METHOD)
    return call(b"", timeout=5, wait_for_ready=True).decode()


def wait_for_backend(grpc, channel, want):
    deadline = time.monotonic() + TIMEOUT
    last = None
    while time.monotonic() < deadline:
        try:
            last = who(grpc, channel)
            if last == want:
                return
        except grpc.RpcError as error:
            last = f"{error.code()}: {error.details()}"
        time.sleep(0.1)
    fail(f"expected {want} within {TIMEOUT}s, last answer: {last}")


def check_csds(grpc, server):
    from envoy.admin.v3 import config_dump_shared_pb2
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
    from envoy.type.matcher.v3 import node_pb2, string_pb2

    request = csds_pb2.ClientStatusRequest(
        node_matchers=[node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(exact=NODE_ID))]
    )
    acked = config_dump_shared_pb2.ClientResourceStatus.ACKED
    want = {LISTENER: TARGET, ROUTE: "greeter-route", CLUSTER: "greeter-cluster", ENDPOINTS: "greeter-cluster"}
    deadline = time.monotonic() + TIMEOUT
    with grpc.insecure_channel(server) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        while True:
            response = stub.FetchClientStatus(request, timeout=5)
            seen = {
                (c.type_url, c.name)
                for config in response.config
                for c in config.generic_xds_configs
                if c.client_status == acked
            }
            if all((t, n) in seen for t, n in want.items()):
                print(f"CSDS: {NODE_ID} ACKed {sorted(seen)}")
                return
            if time.monotonic() > deadline:
                fail(f"CSDS did not show all four types ACKED: {response}")
            time.sleep(0.1)


def main():
    if len(sys.argv) != 3:
        fail(__doc__)
    server, config_dir = sys.argv[1], sys.argv[2]

    bootstrap = {
        "xds_servers": [
            {
                "server_uri": server,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": NODE_ID,
            "cluster": "interop",
            "metadata": {"NAMESPACE": "default"},
            "locality": {"region": "local", "zone": "zone-a"},
        },
    }
    bootstrap_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(bootstrap, bootstrap_file)
    bootstrap_file.close()
    # grpcio reads the bootstrap when the first xds channel is made.
    os.environ["GRPC_XDS_BOOTSTRAP"] = bootstrap_file.name

    import grpc

    backend_1, port_1 = start_backend(grpc, "backend-1")
    backend_2, port_2 = start_backend(grpc, "backend-2")
    print(f"backends: backend-1 on {port_1}, backend-2 on {port_2}")

    write_atomically(os.path.join(config_dir, "routing.yaml"), routing_yaml())
    endpoints = os.path.join(config_dir, "endpoints.yaml")
    write_atomically(endpoints, endpoints_yaml(port_1))

    started = time.monotonic()
    with grpc.insecure_channel(f"xds:///{TARGET}") as channel:
        wait_for_backend(grpc, channel, "backend-1")
        print(f"xds:///{TARGET} -> backend-1 after {time.monotonic() - started:.2f}s")
        check_csds(grpc, server)

        changed = time.monotonic()
        write_atomically(endpoints, endpoints_yaml(port_2))
        wait_for_backend(grpc, channel, "backend-2")
        print(f"endpoints rewritten: xds:///{TARGET} -> backend-2 after {time.monotonic() - changed:.2f}s")
        for _ in range(5):
            if who(grpc, channel) != "backend-2":
                fail("the client went back to backend-1")

    backend_1.stop(None)
    backend_2.stop(None)
    os.unlink(bootstrap_file.name)
    print("OK")


if __name__ == "__main__":
    main()
