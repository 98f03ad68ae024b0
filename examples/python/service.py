#!/usr/bin/env python3
"""A Crux service in Python, with the stock grpcio client and no channel option.

It registers with its node's agent, heartbeats, looks another service up, watches it, and
deregisters cleanly on SIGTERM or SIGINT. Stubs come from the .proto files at start-up
(grpcio-tools), so there is nothing to generate:

    python3 -m pip install -r requirements.txt
    python3 service.py --socket /run/crux/reeve.sock --proto ../../proto/proto \
        --api hello1 --inst hello1_1 --addr 127.0.0.1:8080 --watch galumph2
"""

import argparse
import os
import queue
import signal
import sys
import threading


def load(proto_dir):
    """The reeve and steward modules, compiled from the .proto files."""
    sys.path.insert(0, proto_dir)
    import grpc  # noqa: F401  (grpc.protos_and_services needs grpcio-tools)

    reeve, reeve_grpc = grpc.protos_and_services("crux/reeve/v1/reeve.proto")
    steward = grpc.protos("crux/steward/v1/steward.proto")
    return reeve, reeve_grpc, steward


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", default="/run/crux/reeve.sock")
    p.add_argument("--proto", default=os.path.join(here, "..", "..", "proto", "proto"))
    p.add_argument("--api", default="hello1")
    p.add_argument("--inst", default="hello1_1")
    p.add_argument("--addr", default="127.0.0.1:8080")
    p.add_argument("--watch", default="", help="an api to look up and watch")
    args = p.parse_args()

    import grpc

    reeve, reeve_grpc, steward = load(args.proto)
    channel = grpc.insecure_channel("unix://" + os.path.abspath(args.socket))
    stub = reeve_grpc.ReeveStub(channel)

    reg = stub.Register(
        reeve.RegisterRequest(
            api=args.api,
            inst=args.inst,
            addr=args.addr,
            state=steward.RUN_STATE_RUNNING,
            health=steward.HEALTH_HEALTHY,
        ),
        timeout=10,
    )
    print(f"registered {args.inst} as {reg.id}", flush=True)

    stop = threading.Event()
    beats = queue.Queue()

    def requests():
        # One beat per interval until stopped; the agent acks each one.
        interval = max(reg.heartbeat_interval_ms, 100) / 1000.0
        while not stop.is_set():
            yield reeve.HeartbeatRequest(
                id=reg.id,
                token=reg.token,
                state=steward.RUN_STATE_RUNNING,
                health=steward.HEALTH_HEALTHY,
            )
            stop.wait(interval)

    def heartbeat():
        try:
            for ack in stub.Heartbeat(requests()):
                beats.put(ack)
        except grpc.RpcError as e:
            if not stop.is_set():
                print(f"heartbeat stream ended: {e.code()}", flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    ack = beats.get(timeout=10)
    print(f"heartbeat acked: leader {ack.leader}, steward {ack.steward}", flush=True)

    watch_call = None
    if args.watch:
        found = stub.Lookup(reeve.LookupRequest(selector=args.watch, live_only=True), timeout=10)
        print(f"lookup {args.watch}: {[i.inst for i in found.instances]}", flush=True)
        watch_call = stub.Watch(reeve.WatchRequest(selector=args.watch))

        def watch():
            try:
                for ev in watch_call:
                    kind = "snapshot" if ev.snapshot else "change"
                    print(
                        f"watch {args.watch} {kind} r{ev.revision}: "
                        f"put {[i.inst for i in ev.put]} remove {[i.inst for i in ev.remove]}",
                        flush=True,
                    )
            except grpc.RpcError:
                pass

        threading.Thread(target=watch, daemon=True).start()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("serving; SIGTERM deregisters", flush=True)
    while not stop.is_set():
        stop.wait(0.5)

    if watch_call is not None:
        watch_call.cancel()
    stub.Deregister(reeve.DeregisterRequest(id=reg.id, token=reg.token), timeout=10)
    print(f"deregistered {args.inst}", flush=True)
    channel.close()


if __name__ == "__main__":
    main()
