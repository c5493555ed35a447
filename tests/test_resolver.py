"""test_resolver.py — the resolver end to end: libcoord's xDS server, gRPC's
own xDS client (C core and Python), real etcd, real gRPC backends.

Programs: examples/grpc_echo_server (a gRPC backend that registers itself;
commands on stdin), examples/grpc_echo_client (calls through
coord_registry_get_connection and prints "<unix ms> OK <id>" or
"<unix ms> ERR <code> <details>" per call), coord-xds (the standalone
discovery endpoint) and /usr/bin/python3 with Debian's python3-grpcio.
Every process is started and stopped by PID through the harness.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import end_process, require_build, run_prog, sanitizer_report, start_prog  # noqa: E402

SERVER = "examples/grpc_echo_server"
CLIENT = "examples/grpc_echo_client"
XDS = "coord-xds"


class Lines:
    """Collects a process's stdout lines (with arrival time) in a thread."""

    def __init__(self, proc):
        self.proc = proc
        self.q = queue.Queue()
        self.all = []
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self.lock:
                self.all.append(line)
            self.q.put(line)
        self.q.put(None)

    def expect(self, prefix, timeout=15.0):
        """The next line starting with prefix (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %r line within %.1fs; got %r; stderr: %s" %
                                     (prefix, timeout, self.snapshot()[-20:], self.stderr()))
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("process ended before %r; got %r; stderr: %s" %
                                     (prefix, self.snapshot()[-20:], self.stderr()))
            if line.startswith(prefix):
                return line

    def expect_from_all(self, prefix):
        """A line already received that starts with prefix."""
        for line in self.snapshot():
            if line.startswith(prefix):
                return line
        raise AssertionError("no %r line in %r" % (prefix, self.snapshot()))

    def snapshot(self):
        with self.lock:
            return list(self.all)

    def stderr(self):
        if self.proc.poll() is None:
            return "(running)"
        try:
            return self.proc.stderr.read()[-3000:]
        except Exception:
            return ""


class Backend:
    """A running grpc_echo_server registered as name/id."""

    def __init__(self, etcd, name, id_, endpoints=None, grace=300):
        self.id = id_
        self.proc = start_prog(SERVER, "--name", name, "--id", id_, "--grace", grace,
                               endpoints=endpoints or etcd, stdin=subprocess.PIPE)
        self.out = Lines(self.proc)
        self.port = int(self.out.expect("READY").split()[1])

    def command(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def unregister(self):
        self.command("unregister")
        return int(self.out.expect("UNREGISTERED").split()[1])

    def stop(self):
        """Graceful stop; returns (calls, unix ms of the last call)."""
        self.command("quit")
        self.proc.stdin.close()
        line = self.out.expect("CALLS", timeout=20)
        self.proc.wait(20)
        err = self.proc.stderr.read()
        rep = sanitizer_report(err)
        assert not rep, rep
        assert self.proc.returncode == 0, err
        f = line.split()
        return int(f[1]), int(f[3])

    def kill(self):
        end_process(self.proc, signal.SIGKILL)


@pytest.fixture
def backends():
    made = []

    def make(*a, **kw):
        b = Backend(*a, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        end_process(b.proc)


def calls(lines):
    """[(ms, 'OK', id) or (ms, 'ERR', code)] from client output lines."""
    out = []
    for line in lines:
        f = line.split(" ", 3)
        if len(f) >= 3 and f[1] in ("OK", "ERR"):
            out.append((int(f[0]), f[1], f[2]))
    return out


def finish_client(proc, lines, timeout=60):
    """Wait for a client started with start_prog whose stdout a Lines reads;
    check its exit and stderr; return its calls."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        end_process(proc, signal.SIGKILL)
        raise AssertionError("client did not finish in %ss" % timeout)
    lines.t.join(10)
    err = proc.stderr.read()
    rep = sanitizer_report(err)
    assert not rep, rep
    assert proc.returncode == 0, err
    return calls(lines.snapshot())


def client_run(etcd, name, *args, timeout=60):
    out = run_prog(CLIENT, "--name", name, *args, endpoints=etcd, timeout=timeout)
    return calls(out.splitlines())


@pytest.fixture(autouse=True)
def _need_programs():
    require_build(SERVER)
    require_build(CLIENT)


# --------------------------------------------------------------- C client


def test_round_robin_three_backends(etcd, backends):
    for i in range(3):
        backends(etcd, "rr", "b%d" % i)
    # Calls go to READY connections only: the first few may come before
    # every backend's connection is up.
    res = client_run(etcd, "rr", "--count", 200, "--interval-ms", 2)
    assert all(r[1] == "OK" for r in res), res
    ids = [r[2] for r in res]
    assert set(ids) == {"b0", "b1", "b2"}
    # Once every backend has a connection, round robin cycles through them.
    first_all = max(ids.index(b) for b in ("b0", "b1", "b2"))
    tail = ids[first_all + 1:][-60:]
    assert len(tail) >= 30
    counts = {b: tail.count(b) for b in ("b0", "b1", "b2")}
    assert max(counts.values()) - min(counts.values()) <= 1, (counts, ids)
    for i in range(len(tail) - 2):
        assert len(set(tail[i:i + 3])) == 3, ("not round robin", tail)


def test_pick_first(etcd, backends):
    for i in range(3):
        backends(etcd, "pf", "b%d" % i)
    # long enough for round robin to have spread over all three
    res = client_run(etcd, "pf", "--count", 100, "--interval-ms", 3, "--pick-first")
    assert all(r[1] == "OK" for r in res), res
    assert len({r[2] for r in res}) == 1, res


def test_join_and_graceful_leave_without_reconnect(etcd, backends):
    """One client process (one channel) runs throughout: a new backend gets
    calls, an unregistered one stops getting them within 100 ms, and no call
    fails."""
    b0 = backends(etcd, "dyn", "b0")
    b1 = backends(etcd, "dyn", "b1")
    cl = start_prog(CLIENT, "--name", "dyn", "--duration-ms", 5000, "--interval-ms", 2, endpoints=etcd)
    out = Lines(cl)
    out.expect("", timeout=15)  # calling
    time.sleep(0.8)
    t_join = int(time.time() * 1000)
    b2 = backends(etcd, "dyn", "b2")
    time.sleep(1.2)
    t_unreg = b0.unregister()
    time.sleep(1.0)
    res = finish_client(cl, out)
    assert res, out.snapshot()
    errs = [r for r in res if r[1] != "OK"]
    assert not errs, errs[:10]
    # b2 joined the running channel.
    b2_calls = [r for r in res if r[2] == "b2"]
    assert b2_calls and b2_calls[0][0] >= t_join
    assert b2_calls[0][0] - t_join < 2000
    # b0 left: the client saw its last answer within 100 ms of unregister ...
    last_b0 = max(r[0] for r in res if r[2] == "b0")
    assert last_b0 - t_unreg <= 100, (last_b0, t_unreg)
    # ... and so did b0 itself (its own clock, its own count).
    n0, last0 = b0.stop()
    assert n0 > 0
    assert last0 - t_unreg <= 100, (last0, t_unreg)
    # the others went on answering after b0 left
    assert any(r[2] == "b1" and r[0] > t_unreg + 200 for r in res)
    assert any(r[2] == "b2" and r[0] > t_unreg + 200 for r in res)
    b1.stop()
    b2.stop()


def test_killed_backend_stops_receiving(etcd, backends):
    """SIGKILL: calls in flight may fail, but within 100 ms every call goes
    to the survivors (the lease of the dead one is still alive)."""
    backends(etcd, "kill", "b0")
    b1 = backends(etcd, "kill", "b1")
    cl = start_prog(CLIENT, "--name", "kill", "--duration-ms", 3000, "--interval-ms", 2, endpoints=etcd)
    out = Lines(cl)
    out.expect("", timeout=15)
    time.sleep(1.0)
    t_kill = int(time.time() * 1000)
    b1.kill()
    res = finish_client(cl, out)
    after = [r for r in res if r[0] > t_kill + 100]
    assert after, res[-5:]
    assert all(r[1] == "OK" and r[2] == "b0" for r in after), [r for r in after if r[2] != "b0"][:10]
    assert any(r[2] == "b1" for r in res)


def test_no_instances_then_one_registers(etcd, backends):
    cl = start_prog(CLIENT, "--name", "lonely", "--duration-ms", 4000, "--interval-ms", 10,
                    "--deadline-ms", 1000, endpoints=etcd)
    out = Lines(cl)
    line = out.expect("", timeout=15)
    assert " ERR 14 " in line, line  # UNAVAILABLE, at once
    time.sleep(0.5)
    b = backends(etcd, "lonely", "only")
    t_ready = int(time.time() * 1000)
    res = finish_client(cl, out)
    before = [r for r in res if r[0] < t_ready - 50]
    assert before and all(r[1] == "ERR" and r[2] == "14" for r in before), before[:5]
    oks = [r for r in res if r[1] == "OK"]
    assert oks, res[-5:]
    assert oks[0][0] - t_ready < 500, (oks[0], t_ready)
    assert all(r[1] == "OK" for r in res if r[0] > oks[0][0]), "a call failed after the first success"
    b.stop()


def test_resolve_and_static_target(etcd, backends):
    b0 = backends(etcd, "st", "b0")
    b1 = backends(etcd, "st", "b1")
    out = run_prog(CLIENT, "--name", "st", "--resolve", endpoints=etcd)
    lines = dict((l.split(" ", 1) + [""])[:2] for l in out.splitlines() if " " in l)
    addrs = sorted(l.split()[1] for l in out.splitlines() if l.startswith("ADDRESS "))
    assert addrs == sorted(["127.0.0.1:%d" % b0.port, "127.0.0.1:%d" % b1.port])
    assert lines["TARGET"].startswith("ipv4:")
    assert sorted(lines["TARGET"][5:].split(",")) == addrs
    assert json.loads(lines["SERVICE_CONFIG"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    res = client_run(etcd, "st", "--static", "--count", 60, "--interval-ms", 10)
    assert all(r[1] == "OK" for r in res) and {r[2] for r in res} == {"b0", "b1"}
    out = run_prog(CLIENT, "--name", "nobody", "--resolve", endpoints=etcd)
    assert "TARGET \n" in out or out.splitlines()[-2] == "TARGET "


def test_refuses_foreign_bootstrap(etcd, backends):
    backends(etcd, "fb", "b0")
    env = dict(os.environ)
    env["GRPC_XDS_BOOTSTRAP_CONFIG"] = '{"xds_servers":[]}'
    r = run_prog(CLIENT, "--name", "fb", "--count", 1, endpoints=etcd, env=env, check=False, result=True)
    assert r.returncode == 1
    assert "bootstrap of its own" in r.stderr, r.stderr


def test_watch_reconnect_does_not_lose_updates(etcd_cluster, backends):
    """The member serving the client's registry watch goes down; changes
    made meanwhile through the other members reach the client; so do
    changes after it comes back."""
    all_eps = etcd_cluster.all_endpoints
    others = ",".join(m.endpoint for m in etcd_cluster.members[1:])
    b0 = backends(etcd_cluster, "rc", "b0", endpoints=others)
    cl = start_prog(CLIENT, "--name", "rc", "--duration-ms", 9000, "--interval-ms", 5, endpoints=all_eps)
    out = Lines(cl)
    out.expect("", timeout=15)
    time.sleep(0.5)
    etcd_cluster.stop(0)  # the client's first endpoint: its watch moves
    b1 = backends(etcd_cluster, "rc", "b1", endpoints=others)
    t_b1 = int(time.time() * 1000)
    time.sleep(2.0)
    t_unreg = b0.unregister()
    time.sleep(1.0)
    etcd_cluster.start_member(0)
    time.sleep(1.0)
    b2 = backends(etcd_cluster, "rc", "b2", endpoints=others)
    t_b2 = int(time.time() * 1000)
    res = finish_client(cl, out)
    assert any(r[2] == "b1" and r[0] >= t_b1 for r in res), "b1 (registered while the member was down) never called"
    late_b0 = [r for r in res if r[2] == "b0" and r[0] > t_unreg + 1000]
    assert not late_b0, late_b0[:5]
    assert any(r[2] == "b2" and r[0] >= t_b2 for r in res), "b2 (registered after the restart) never called"
    errs = [r for r in res if r[1] != "OK"]
    assert not errs, errs[:10]
    b0.stop()
    b1.stop()
    b2.stop()


# --------------------------------------------------------------- other languages

# Calls go to READY connections only, so the client calls until every
# expected backend has answered (a loaded machine may connect the second one
# after the first few calls), then makes 10 more: with both connections up,
# round robin alternates.  It prints "TAIL" and those ids.
PY_CLIENT = textwrap.dedent("""
    import sys, time, grpc
    name, want = sys.argv[1], set(sys.argv[2:])
    ch = grpc.insecure_channel("xds:///" + name)
    who = ch.unary_unary("/coord.example.Echo/Who")
    seen, deadline = [], time.monotonic() + 30
    while not want <= set(seen) and time.monotonic() < deadline:
        seen.append(who(b"", timeout=10).decode())
        time.sleep(0.002)
    print(" ".join(seen), flush=True)
    print("TAIL " + " ".join(who(b"", timeout=10).decode() for i in range(10)), flush=True)
""")


def test_python_client_through_coord_xds(etcd, backends, tmp_path):
    require_build(XDS)
    # --print-bootstrap needs no etcd
    boot = json.loads(run_prog(XDS, "--print-bootstrap", "--listen", "127.0.0.1:18000"))
    assert boot["xds_servers"][0]["server_uri"] == "127.0.0.1:18000"
    assert boot["xds_servers"][0]["channel_creds"] == [{"type": "insecure"}]
    assert "xds_v3" in boot["xds_servers"][0]["server_features"]

    bootfile = str(tmp_path / "bootstrap.json")
    xds = start_prog(XDS, "--listen", "127.0.0.1:0", "--bootstrap-file", bootfile, endpoints=etcd)
    want = {"py": ["p0", "p1"], "py2": ["q0", "q1"]}
    try:
        Lines(xds).expect("LISTENING")
        for i in range(2):
            backends(etcd, "py", "p%d" % i)
            backends(etcd, "py2", "q%d" % i)
        script = tmp_path / "client.py"
        script.write_text(PY_CLIENT)
        env = dict(os.environ)
        env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
        env["GRPC_XDS_BOOTSTRAP"] = bootfile
        # several clients (several ADS streams) and two services at once
        names = ("py", "py2", "py", "py2")
        procs = [subprocess.Popen(["/usr/bin/python3", str(script), svc] + want[svc], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for svc in names]
        for p, svc in zip(procs, names):
            try:
                o, e = p.communicate(timeout=60)
            finally:
                end_process(p, signal.SIGKILL)
            assert p.returncode == 0, e
            first, tail = o.splitlines()
            assert set(first.split()) == set(want[svc]), (svc, o)
            tail = tail.split()[1:]
            assert len(tail) == 10 and set(tail) <= set(want[svc]), (svc, o)
            # both connections are up: round robin alternates
            assert all(a != b for a, b in zip(tail, tail[1:])), ("not round robin", svc, o)
    finally:
        end_process(xds)
    err = xds.stderr.read()
    assert not sanitizer_report(err), err
    assert xds.returncode == 0, err


def test_ads_protocol(etcd, backends, tmp_path):
    """resolver_ads speaks ADS to coord-xds directly: resources, ACK, NACK
    (logged, not answered), stale nonce, push on a registry change, name
    change, clean close."""
    require_build(XDS)
    prog = require_build("tests/resolver_ads")
    xds = start_prog(XDS, "--listen", "127.0.0.1:0", endpoints=etcd)
    try:
        port = int(Lines(xds).expect("LISTENING").split()[1])
        backends(etcd, "ads", "a0")
        p = start_prog(prog, "127.0.0.1:%d" % port, "ads", 1, endpoints=etcd)
        out = Lines(p)
        out.expect("WAITING")
        backends(etcd, "ads", "a1")
        out.expect("CLOSE ok")
        p.wait(20)
        assert p.returncode == 0, (out.snapshot(), p.stderr.read())
        push_ms = int(out.expect_from_all("PUSH").split()[1])
        assert push_ms < 2000
    finally:
        end_process(xds)
    err = xds.stderr.read()
    assert not sanitizer_report(err), err
    assert "NACKed EDS" in err and "resolver_ads test nack" in err, err


def test_one_client_many_channels(etcd, backends):
    """One process: round_robin channels to two services and a pick_first
    channel, all served by the same in-process xDS server."""
    prog = require_build("tests/resolver_multi")
    for i in range(2):
        backends(etcd, "ma", "a%d" % i)
        backends(etcd, "mb", "b%d" % i)
    out = run_prog(prog, "ma", "mb", 100, endpoints=etcd)
    assert "PASS failed=0" in out, out[-2000:]
    for line in out.splitlines()[:-1]:
        ch, who = line.split()
        assert who.startswith("a" if ch.startswith("A") else "b"), line
