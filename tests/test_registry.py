"""test_registry.py — libcoord's service registry against a real etcd.

Drives tests/c/registry_checks.c (self-checking scenarios) and
tests/c/registry_tool.c (a command-line driver), and checks what reaches
etcd with etcdctl: the key layout /services/<name>/<id>, the JSON document,
the lease, re-registration after the lease is revoked from outside, and
instances written by other clients.
"""

import json
import subprocess
import time

import pytest

from harness import finish_prog, require_build, run_prog, start_prog, wait_for


def checks(etcd, scenario, timeout=120):
    require_build("tests/registry_checks")
    out = run_prog("tests/registry_checks", scenario, endpoints=etcd, timeout=timeout, check=False, result=True)
    assert out.returncode == 0 and "ok %s" % scenario in out.stdout, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("scenario", ["documents", "arguments", "lifecycle", "healing", "watch", "foreign",
                                      "namespace", "threads"])
def test_registry_scenarios(etcd, scenario):
    checks(etcd, scenario)


def lease_of(etcd, key):
    r = etcd.etcdctl_json("get", key)
    kvs = r.get("kvs") or []
    return int(kvs[0].get("lease", 0)) if kvs else None


def start_instance(etcd, name, iid, address="127.0.0.1", port=8080, ttl_ms=10000, metadata=None):
    require_build("tests/registry_tool")
    args = ["register", name, iid, address, port, ttl_ms]
    if metadata is not None:
        args.append(json.dumps(metadata))
    p = start_prog("tests/registry_tool", *args, endpoints=etcd, stdin=subprocess.PIPE)
    line = p.stdout.readline()
    assert line.strip() == "registered", line + p.stderr.read()
    return p


def stop_instance(p, how="quit"):
    p.stdin.write(how + "\n")
    p.stdin.flush()
    out, _ = finish_prog(p, timeout=30)
    return out


def test_registered_instance_visible_to_etcdctl(etcd):
    p = start_instance(etcd, "chat", "chat-1", "10.0.0.5", 9000, metadata={"zone": "eu", "weight": 2})
    try:
        kv = etcd.get_prefix("/services/")
        assert list(kv) == ["/services/chat/chat-1"]
        doc = json.loads(kv["/services/chat/chat-1"])
        assert doc == {"id": "chat-1", "name": "chat", "address": "10.0.0.5", "port": 9000,
                       "metadata": {"zone": "eu", "weight": 2}}
        lease = lease_of(etcd, "/services/chat/chat-1")
        assert lease
        ttl = etcd.etcdctl_json("lease", "timetolive", "%x" % lease)
        assert ttl["granted-ttl"] == 10
    finally:
        out = stop_instance(p)
    assert "unregistered" in out
    assert etcd.get_prefix("/services/") == {}


def test_close_removes_registration(etcd):
    p = start_instance(etcd, "chat", "c2")
    assert etcd.get("/services/chat/c2") is not None
    out = stop_instance(p, "close")
    assert "unregistered" not in out and "closed" in out
    assert etcd.get("/services/chat/c2") is None


def test_keepalive_outlives_ttl(etcd):
    p = start_instance(etcd, "ka", "k1", ttl_ms=2000)
    try:
        lease = lease_of(etcd, "/services/ka/k1")
        time.sleep(5)
        assert lease_of(etcd, "/services/ka/k1") == lease
    finally:
        stop_instance(p)


@pytest.mark.parametrize("ttl_ms", [10000, 3000])
def test_revoked_lease_reregisters_within_2s(etcd, ttl_ms):
    p = start_instance(etcd, "web", "w1", ttl_ms=ttl_ms)
    try:
        key = "/services/web/w1"
        for _ in range(3):
            old = lease_of(etcd, key)
            assert old
            t0 = time.monotonic()
            etcd.etcdctl("lease", "revoke", "%x" % old)
            new = wait_for(lambda: (lambda l: l if l and l != old else None)(lease_of(etcd, key)), 2.0,
                           what="re-registration after lease revoke")
            took = time.monotonic() - t0
            assert took < 2.0
            assert json.loads(etcd.get(key))["address"] == "127.0.0.1"
            # and the new lease is kept alive
            ttl = etcd.etcdctl_json("lease", "timetolive", "%x" % new)
            assert ttl["ttl"] > 0
    finally:
        stop_instance(p)
    assert etcd.get("/services/web/w1") is None


def test_deleted_key_reregisters(etcd):
    p = start_instance(etcd, "web", "w2")
    try:
        etcd.etcdctl("del", "/services/web/w2")
        wait_for(lambda: etcd.get("/services/web/w2"), 2.0, what="re-registration after delete")
    finally:
        stop_instance(p)


def test_discover_instance_written_by_etcdctl(etcd):
    etcd.put("/services/pay/p1", json.dumps({"address": "10.9.9.9", "port": 443}))
    lease = etcd.lease_grant(30)
    etcd.put("/services/pay/p2", json.dumps({"id": "p2", "name": "pay", "address": "10.9.9.8", "port": 444,
                                             "metadata": {"v": "2"}}), "--lease=%x" % lease)
    etcd.put("/services/pay/p3", "garbage")
    etcd.put("/services/pay/p4", json.dumps({"address": "x", "port": 0}))
    etcd.put("/services/payment/q1", json.dumps({"address": "10.0.0.1", "port": 1}))
    out = run_prog("tests/registry_tool", "discover", "pay", endpoints=etcd)
    lines = out.splitlines()
    assert lines[-1] == "n=2"
    docs = [json.loads(l) for l in lines[:-1]]
    assert docs[0] == {"id": "p1", "name": "pay", "address": "10.9.9.9", "port": 443, "metadata": {}}
    assert docs[1] == {"id": "p2", "name": "pay", "address": "10.9.9.8", "port": 444, "metadata": {"v": "2"}}


def test_watch_sees_put_and_delete(etcd):
    require_build("tests/registry_tool")
    etcd.put("/services/feed/f0", json.dumps({"address": "h0", "port": 1}))
    p = start_prog("tests/registry_tool", "watch", "feed", 4, 5000, "current", endpoints=etcd)
    assert p.stdout.readline().strip() == "ready"
    etcd.put("/services/feed/f1", json.dumps({"address": "h1", "port": 2}))
    etcd.put("/services/feedback/x", json.dumps({"address": "hx", "port": 3}))  # other service
    etcd.etcdctl("del", "/services/feed/f0")
    etcd.put("/services/feed/f2", json.dumps({"address": "h2", "port": 70000}))  # invalid: gone
    out, _ = finish_prog(p, timeout=30)
    evs = [json.loads(l) for l in out.splitlines()]
    assert [(e["type"], e["id"]) for e in evs] == [("PUT", "f0"), ("PUT", "f1"), ("DELETE", "f0"),
                                                  ("DELETE", "f2")]
    assert all(e["name"] == "feed" for e in evs)
    assert evs[1]["doc"] == {"id": "f1", "name": "feed", "address": "h1", "port": 2, "metadata": {}}
    assert evs[2].get("doc") is None


def test_watch_all_services_and_registrations(etcd):
    require_build("tests/registry_tool")
    w = start_prog("tests/registry_tool", "watch", "-", 3, 5000, endpoints=etcd)
    assert w.stdout.readline().strip() == "ready"
    p = start_instance(etcd, "a", "a1", port=1)
    etcd.put("/services/b/b1", json.dumps({"address": "h", "port": 2}))
    stop_instance(p)
    out, _ = finish_prog(w, timeout=30)
    evs = [json.loads(l) for l in out.splitlines()]
    assert [(e["type"], e["name"], e["id"]) for e in evs] == [("PUT", "a", "a1"), ("PUT", "b", "b1"),
                                                             ("DELETE", "a", "a1")]


def test_unregister_other_clients_instance(etcd):
    etcd.put("/services/x/x1", json.dumps({"address": "h", "port": 2}))
    assert run_prog("tests/registry_tool", "unregister", "x", "x1", endpoints=etcd).strip() == "ok"
    assert etcd.get("/services/x/x1") is None
    assert run_prog("tests/registry_tool", "unregister", "x", "x1", endpoints=etcd).strip() == "ENOTFOUND"


def test_invalid_registration_rejected(etcd):
    require_build("tests/registry_tool")
    for args in (["svc", "id", "", 80], ["svc", "id", "h", 0], ["svc", "id", "h", 65536], ["s/v", "id", "h", 1],
                 ["svc", "i/d", "h", 1], ["", "id", "h", 1]):
        r = run_prog("tests/registry_tool", "register", *args, 1000, endpoints=etcd, check=False, result=True)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "invalid argument" in r.stderr
    assert etcd.get_prefix("/services/") == {}


def test_expired_lease_reregisters(etcd):
    """The registering process is paused (SIGSTOP) past its lease's TTL: etcd
    expires the lease and deletes the key; once resumed, the client notices
    and registers again by itself."""
    import os
    import signal
    p = start_instance(etcd, "paused", "p1", ttl_ms=2000)
    key = "/services/paused/p1"
    try:
        old = lease_of(etcd, key)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: etcd.get(key) is None, 10.0, what="lease expiry while paused")
        finally:
            os.kill(p.pid, signal.SIGCONT)
        new = wait_for(lambda: (lambda l: l if l and l != old else None)(lease_of(etcd, key)), 5.0,
                       what="re-registration after expiry")
        assert new != old
        time.sleep(3)  # and it stays registered (kept alive)
        assert lease_of(etcd, key) == new
    finally:
        stop_instance(p)
    assert etcd.get(key) is None


def test_registration_survives_etcd_restart(etcd):
    """etcd goes away for longer than the TTL and comes back: the instance
    is registered again (new lease) and kept alive."""
    p = start_instance(etcd, "survivor", "s1", ttl_ms=2000)
    key = "/services/survivor/s1"
    try:
        m = etcd.members[0]
        m.stop()
        time.sleep(4)
        m.restart()
        wait_for(lambda: lease_of(etcd, key), 10.0, what="registration after etcd restart")
        time.sleep(4)  # longer than the TTL: kept alive on the new stream
        lease = lease_of(etcd, key)
        assert lease
        ttl = etcd.etcdctl_json("lease", "timetolive", "%x" % lease)
        assert ttl["ttl"] > 0
        assert json.loads(etcd.get(key))["id"] == "s1"
    finally:
        stop_instance(p)
    assert etcd.get(key) is None
