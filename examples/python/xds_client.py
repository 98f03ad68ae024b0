#!/usr/bin/env python3
"""gRPC's own xDS client against a Crux agent's ADS server (the conformance script of
agent/tests/xds.rs; README "Routes (xDS)").

Modes:

    xds_client.py serve PORT NAME [HOST]
        A gRPC server on HOST:PORT (default 127.0.0.1) answering /crux.test.Echo/Who with NAME.
        Prints "ready" once it serves.

    xds_client.py call TARGET [SECONDS]
        Calls /crux.test.Echo/Who on TARGET (xds:///NAME, with GRPC_XDS_BOOTSTRAP naming the
        agent's ADS server) every 20 ms for SECONDS (default: until stdin closes) and prints one
        line per call: "ok BACKEND" or "err CODE DETAILS".

    xds_client.py nack ADS NAME
        A raw state-of-the-world ADS client on xds-protos: asks for Listener NAME, decodes it
        (API listener, HttpConnectionManager, RDS name), prints "listener NAME rds ROUTECONFIG",
        rejects it with error "crux-test: rejected on purpose", and prints "resent N": how many
        responses came in the next 2 s (0: the server keeps the last good config and does not
        send the rejected version again).

    xds_client.py silent ADS NAME
        Asks for Listener NAME, prints "first VERSION", never acknowledges, and prints "more N":
        responses that came in the next SECONDS (stdin line or 4 s).

    xds_client.py garbage ADS
        Sends bytes that are no DiscoveryRequest on an ADS stream; prints "status CODE DETAILS".
"""

import queue
import sys
import threading
import time

import grpc

METHOD = "/crux.test.Echo/Who"


def serve(port, name, host="127.0.0.1"):
    from concurrent import futures

    def who(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "crux.test.Echo",
        {"Who": grpc.unary_unary_rpc_method_handler(who)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(target, seconds=None):
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary(METHOD)
    stop = threading.Event()
    if seconds is None:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        end = None
    else:
        end = time.monotonic() + float(seconds)
    while not stop.is_set() and (end is None or time.monotonic() < end):
        try:
            backend = who(b"", timeout=2).decode()
            print("ok", backend, flush=True)
        except grpc.RpcError as e:
            print("err", e.code().name, (e.details() or "").replace("\n", " "), flush=True)
        time.sleep(0.02)


def ads_stub(ads):
    from envoy.service.discovery.v3 import ads_pb2_grpc

    channel = grpc.insecure_channel(ads)
    return channel, ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)


LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


def request(node, name, version="", nonce="", error=None):
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.rpc import status_pb2

    r = discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=node),
        type_url=LISTENER,
        resource_names=[name],
        version_info=version,
        response_nonce=nonce,
    )
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def raw_stream(ads, first):
    """An ADS stream: a queue to send on (None ends it) and a queue of responses."""
    _, stub = ads_stub(ads)
    out = queue.Queue()
    out.put(first)
    responses = queue.Queue()

    def requests():
        while True:
            r = out.get()
            if r is None:
                return
            yield r

    def read():
        try:
            for resp in stub.StreamAggregatedResources(requests()):
                responses.put(resp)
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    return out, responses


def nack(ads, name):
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    out, responses = raw_stream(ads, request("crux-test-nack", name))
    resp = responses.get(timeout=10)
    listener = listener_pb2.Listener()
    resp.resources[0].Unpack(listener)
    hcm = hcm_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(hcm)
    print("listener", listener.name, "rds", hcm.rds.route_config_name, flush=True)
    out.put(request("crux-test-nack", name, nonce=resp.nonce,
                    error="crux-test: rejected on purpose"))
    n = 0
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            responses.get(timeout=max(0.01, end - time.monotonic()))
            n += 1
        except queue.Empty:
            break
    print("resent", n, flush=True)
    out.put(None)


def silent(ads, name):
    _, responses = raw_stream(ads, request("crux-test-silent", name))
    resp = responses.get(timeout=10)
    print("first", resp.version_info, flush=True)
    sys.stdin.readline()
    n = 0
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            responses.get(timeout=max(0.01, end - time.monotonic()))
            n += 1
        except queue.Empty:
            break
    print("more", n, flush=True)


def garbage(ads):
    channel = grpc.insecure_channel(ads)
    stream = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    )
    try:
        for _ in stream(iter([b"\xff\xff\xff\xff\x0fnot a request"]), timeout=10):
            pass
        print("status OK", flush=True)
    except grpc.RpcError as e:
        print("status", e.code().name, (e.details() or "").replace("\n", " "), flush=True)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        serve(*args)
    elif mode == "call":
        call(*args)
    elif mode == "nack":
        nack(*args)
    elif mode == "silent":
        silent(*args)
    elif mode == "garbage":
        garbage(*args)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
