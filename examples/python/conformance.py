#!/usr/bin/env python3
"""Conformance of the local API with the stock Python grpcio client (issue 24), run by
agent/tests/local_api.rs against a live two-node flock:

    conformance.py NODE1_SOCKET NODE2_SOCKET PROTO_DIR

No channel option anywhere: grpcio sends the percent-encoded socket path as :authority.
Register on node 1, heartbeat, look up and watch on node 2 (snapshot, then a change),
deregister; the example service (service.py) registers and deregisters on SIGTERM; reflection
(v1alpha through grpcio-reflection, v1 by its method) lists the services; grpc.health.v1 says
SERVING. Prints "conformance: ok" at the end; any failure raises.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

DEADLINE_S = 20


def wait_for(what, check, deadline_s=DEADLINE_S):
    """Polls check() until it returns something true, up to a deadline."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def main():
    s1, s2, proto = sys.argv[1:4]
    sys.path.insert(0, proto)
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    reeve, reeve_grpc = grpc.protos_and_services("crux/reeve/v1/reeve.proto")
    steward = grpc.protos("crux/steward/v1/steward.proto")
    print(f"grpcio {grpc.__version__}, no channel options")

    ch1 = grpc.insecure_channel("unix://" + s1)
    ch2 = grpc.insecure_channel("unix://" + s2)
    n1, n2 = reeve_grpc.ReeveStub(ch1), reeve_grpc.ReeveStub(ch2)

    members = n1.Members(reeve.MembersRequest(), timeout=10)
    print(f"Members on node 1: {len(members.members)}")
    assert len(members.members) == 2, members

    def register(stub, inst):
        return stub.Register(
            reeve.RegisterRequest(
                api="pyconf1",
                inst=inst,
                addr="127.0.0.1:9",
                state=steward.RUN_STATE_RUNNING,
                health=steward.HEALTH_HEALTHY,
            ),
            timeout=10,
        )

    # Node 2 watches first, so it sees the snapshot and then the changes.
    events = queue.Queue()
    watch = n2.Watch(reeve.WatchRequest(selector="pyconf1"), timeout=120)

    def read_watch():
        try:
            for ev in watch:
                events.put(ev)
        except grpc.RpcError as e:
            events.put(e)

    threading.Thread(target=read_watch, daemon=True).start()
    first = events.get(timeout=DEADLINE_S)
    assert not isinstance(first, Exception) and first.snapshot, first
    print(f"Watch on node 2: snapshot at r{first.revision}, {len(first.put)} instances")

    reg = register(n1, "pyconf1_1")
    print(f"Register on node 1: {reg.id}, heartbeat every {reg.heartbeat_interval_ms} ms")
    stop = threading.Event()
    acks = queue.Queue()

    def beats():
        while not stop.is_set():
            yield reeve.HeartbeatRequest(
                id=reg.id,
                token=reg.token,
                state=steward.RUN_STATE_RUNNING,
                health=steward.HEALTH_HEALTHY,
            )
            stop.wait(reg.heartbeat_interval_ms / 1000.0)

    hb = n1.Heartbeat(beats())
    threading.Thread(target=lambda: [acks.put(a) for a in hb], daemon=True).start()
    ack = acks.get(timeout=DEADLINE_S)
    print(f"Heartbeat acked: leader {ack.leader}, steward {ack.steward}")
    assert ack.leader

    t0 = time.monotonic()
    found = wait_for(
        "pyconf1_1 in a lookup on node 2",
        lambda: [
            i
            for i in n2.Lookup(reeve.LookupRequest(selector="pyconf1"), timeout=5).instances
            if i.inst == "pyconf1_1"
        ],
    )
    print(f"Lookup on node 2: {found[0].inst} at {found[0].addr}, "
          f"{(time.monotonic() - t0) * 1000:.0f} ms after registering")

    def watch_until(pred, what):
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            try:
                ev = events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            assert not isinstance(ev, Exception), ev
            if pred(ev):
                return ev
        raise AssertionError(f"watch on node 2: no {what}")

    ev = watch_until(lambda e: any(i.inst == "pyconf1_1" for i in e.put), "put of pyconf1_1")
    print(f"Watch on node 2: change r{ev.revision} puts pyconf1_1")

    reg2 = register(n1, "pyconf1_2")
    ev = watch_until(lambda e: any(i.inst == "pyconf1_2" for i in e.put), "put of pyconf1_2")
    print(f"Watch on node 2: change r{ev.revision} puts pyconf1_2 (the best instance now)")

    n1.Deregister(reeve.DeregisterRequest(id=reg2.id, token=reg2.token), timeout=10)
    stop.set()
    n1.Deregister(reeve.DeregisterRequest(id=reg.id, token=reg.token), timeout=10)
    wait_for(
        "pyconf1 gone from node 2",
        lambda: not n2.Lookup(reeve.LookupRequest(selector="pyconf1", live_only=True),
                              timeout=5).instances,
    )
    print("Deregister on node 1: pyconf1 gone from node 2")
    watch.cancel()

    # The example service: registers, heartbeats, watches; deregisters on SIGTERM.
    here = os.path.dirname(os.path.abspath(__file__))
    ex = subprocess.Popen(
        [sys.executable, os.path.join(here, "service.py"), "--socket", s1, "--proto", proto,
         "--api", "pyex1", "--inst", "pyex1_1", "--addr", "127.0.0.1:10", "--watch", "pyconf1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in ex.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        assert any(line.startswith("registered") for line in lines), lines
        wait_for("pyex1_1 on node 2", lambda: n2.Lookup(
            reeve.LookupRequest(selector="pyex1", live_only=True), timeout=5).instances)
        ex.send_signal(signal.SIGTERM)
        rest, _ = ex.communicate(timeout=DEADLINE_S)
        lines.append(rest)
        out = "".join(lines)
        assert ex.returncode == 0 and "deregistered pyex1_1" in out, out
        wait_for("pyex1 gone from node 2", lambda: not n2.Lookup(
            reeve.LookupRequest(selector="pyex1", live_only=True), timeout=5).instances)
        print("examples/python/service.py: registered, heartbeated, deregistered on SIGTERM")
    finally:
        if ex.poll() is None:
            ex.kill()
            ex.wait()

    # Reflection, v1alpha (grpcio-reflection's client) and v1 (same messages, v1 method).
    db = ProtoReflectionDescriptorDatabase(ch1)
    services = sorted(db.get_services())
    print(f"Reflection v1alpha lists: {', '.join(services)}")
    for want in ("crux.reeve.v1.Reeve", "crux.pastiche.v1.Cache", "crux.proctor.v1.Placement",
                 "grpc.health.v1.Health"):
        assert want in services, services
    from google.protobuf.descriptor_pool import DescriptorPool
    pool = DescriptorPool(db)
    methods = [m.name for m in pool.FindServiceByName("crux.reeve.v1.Reeve").methods]
    assert "Register" in methods and "Watch" in methods, methods
    print(f"Reflection: crux.reeve.v1.Reeve has {len(methods)} methods")
    v1 = ch1.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    resp = next(iter(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                        timeout=10)))
    v1_names = sorted(s.name for s in resp.list_services_response.service)
    assert "crux.reeve.v1.Reeve" in v1_names, v1_names
    print(f"Reflection v1 lists {len(v1_names)} services")

    # grpc.health.v1: HealthCheckRequest{service: ""} is empty; SERVING is status 1.
    check = ch1.unary_unary("/grpc.health.v1.Health/Check",
                            request_serializer=lambda b: b, response_deserializer=lambda b: b)
    assert check(b"", timeout=10) == b"\x08\x01"
    # HealthCheckRequest{service: "crux.proctor.v1.Placement"}: SERVING once the agent is ready.
    name = b"crux.proctor.v1.Placement"
    wait_for("placement SERVING",
             lambda: check(b"\x0a" + bytes([len(name)]) + name, timeout=10) == b"\x08\x01")
    print("Health: SERVING (the server, and crux.proctor.v1.Placement)")

    ch1.close()
    ch2.close()
    print("conformance: ok")


if __name__ == "__main__":
    main()
