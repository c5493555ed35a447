"""test_harness.py — the fixtures themselves work against real etcd."""

import os
import signal
import stat
import subprocess
import time

import pytest

import harness
from harness import EtcdctlError, ProgError


def test_single_member_put_get(etcd):
    assert len(etcd.members) == 1
    m = etcd.members[0]
    assert etcd.endpoints == m.endpoint and m.endpoint.startswith("127.0.0.1:")
    assert m.running and os.path.exists("/proc/%d" % m.pid)
    etcd.etcdctl("put", "/harness/k", "hello")
    assert etcd.etcdctl("get", "/harness/k", "--print-value-only").strip() == "hello"
    assert etcd.get("/harness/k") == "hello"
    assert etcd.get("/harness/missing") is None
    etcd.put("/harness/k2", "x y")
    assert etcd.get_prefix("/harness/") == {"/harness/k": "hello", "/harness/k2": "x y"}
    st = etcd.status()
    assert st["leader"] == st["header"]["member_id"]
    assert etcd.leader() is m
    assert etcd.revision() >= 3


def test_etcdctl_error_raises(etcd):
    with pytest.raises(EtcdctlError) as e:
        etcd.etcdctl("no-such-command")
    assert e.value.returncode != 0
    assert etcd.etcdctl("no-such-command", check=False) is not None


def test_stop_is_by_pid_and_cleans_up(etcd_factory):
    c = etcd_factory(size=1)
    pid, d = c.members[0].pid, c.dir
    c.close()
    assert not os.path.exists("/proc/%d" % pid) or _zombie_or_gone(pid)
    assert not os.path.exists(d)


def _zombie_or_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def test_free_port_avoids_ephemeral_range():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [harness.free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(p < low for p in ports)


def test_sweep_stale_removes_dead_runs_only(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = harness.EtcdCluster(base_dir=str(tmp_path)).start()
    live = harness.EtcdCluster(base_dir=str(tmp_path)).start()
    try:
        with open(os.path.join(stale.dir, "owner"), "w") as f:
            f.write("%d\n" % dead.pid)  # as if its pytest had been killed
        spid = stale.members[0].pid
        harness.sweep_stale(str(tmp_path))
        assert not os.path.exists(stale.dir)
        harness.wait_for(lambda: stale.members[0].proc.poll() is not None, 10, what="stale etcd killed")
        assert stale.members[0].proc.returncode == -signal.SIGKILL and spid
        assert os.path.exists(live.dir) and live.members[0].health()
    finally:
        stale.close()
        live.close()


def test_compact(etcd):
    for v in ("1", "2", "3"):
        etcd.put("/harness/c", v)
    old = etcd.revision() - 1
    rev = etcd.compact()
    assert rev == etcd.revision()
    with pytest.raises(EtcdctlError) as e:
        etcd.etcdctl("get", "/harness/c", "--rev", str(old))
    assert "compacted" in str(e.value)
    assert etcd.get("/harness/c") == "3"


def test_lease_grant(etcd):
    lid = etcd.lease_grant(30)
    etcd.put("/harness/leased", "v", "--lease", "%x" % lid)
    ttl = etcd.etcdctl_json("lease", "timetolive", "%x" % lid)
    assert ttl["id"] == lid and 0 < ttl["ttl"] <= 30 and ttl["granted-ttl"] == 30


@pytest.mark.cluster
def test_cluster_survives_leader_kill_and_restart(etcd_cluster):
    c = etcd_cluster
    assert len(c.members) == 3 and len(c.endpoints.split(",")) == 3
    assert len({m.pid for m in c.members}) == 3
    c.put("/harness/k", "before")
    old = c.leader()
    assert old in c.members and len(c.followers()) == 2
    old.kill()
    assert not old.running
    assert old.endpoint not in c.endpoints  # only serving members
    new = c.leader()
    assert new is not old
    c.put("/harness/k", "after")
    assert c.get("/harness/k") == "after"
    c.restart(old)
    assert old.running and old.health()
    # the restarted member caught up: ask it alone, serializable (local) read
    harness.wait_for(lambda: c.etcdctl("get", "/harness/k", "--print-value-only",
                                       "--consistency=s", endpoints=old.endpoint).strip() == "after",
                     10, 0.1, "restarted member to catch up")
    assert len(c.endpoints.split(",")) == 3


@pytest.mark.cluster
def test_cluster_pause_resume_and_stop(etcd_cluster):
    c = etcd_cluster
    f = c.followers()[0]
    f.pause()
    assert f.paused and f.running and f.endpoint not in c.endpoints
    assert not f.health(timeout=0.3)
    c.put("/harness/p", "1")  # quorum of two still writes
    f.resume()
    c.wait_healthy([f], 10)
    harness.wait_for(lambda: c.etcdctl("get", "/harness/p", "--print-value-only", "--consistency=s",
                                       endpoints=f.endpoint).strip() == "1", 10, 0.1, "resumed member")
    # pausing the leader makes the others elect a new one
    ld = c.leader()
    ld.pause()
    new = c.leader(timeout=20)
    assert new is not ld
    ld.resume()
    c.wait_healthy(timeout=20)
    # graceful stop and start of a member
    f = c.followers()[0]
    c.stop(f)
    assert not f.running
    c.put("/harness/p", "2")
    c.start_member(f)
    assert f.health()


def test_auth_helper(etcd):
    etcd.enable_auth("rootpw")
    etcd.add_user("alice", "alicepw", prefix="/app/")
    etcd.add_user("bob", "bobpw", prefix="/app/", readonly=True)
    etcd.put("/app/x", "1")  # etcdctl() runs as root now
    etcd.put("/other", "o")
    assert etcd.etcdctl("put", "/app/y", "2", user="alice:alicepw")
    assert etcd.get("/app/y", user="bob:bobpw") == "2"
    with pytest.raises(EtcdctlError, match="permission denied"):
        etcd.etcdctl("put", "/other", "x", user="alice:alicepw")
    with pytest.raises(EtcdctlError, match="permission denied"):
        etcd.etcdctl("get", "/other", user="alice:alicepw")
    with pytest.raises(EtcdctlError, match="permission denied"):
        etcd.etcdctl("put", "/app/z", "3", user="bob:bobpw")
    with pytest.raises(EtcdctlError, match="authentication failed"):
        etcd.etcdctl("get", "/app/x", user="alice:wrong")
    # no credentials at all: refused
    r = subprocess.run([harness.ETCDCTL, "--endpoints", etcd.endpoints, "get", "/app/x"],
                       env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert etcd.users == {"alice": "alicepw", "bob": "bobpw"}


def test_tls_certs(tls_certs):
    for crt in (tls_certs.server_cert, tls_certs.client_cert):
        r = subprocess.run(["openssl", "verify", "-CAfile", tls_certs.ca, crt], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    crt, key = tls_certs.client("alice")
    out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in", crt], capture_output=True,
                         text=True, timeout=30).stdout
    assert "CN = alice" in out and os.path.exists(key)
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", tls_certs.server_cert],
                         capture_output=True, text=True, timeout=30).stdout
    assert "127.0.0.1" in san and "localhost" in san


def test_tls_etcd(etcd_tls):
    c = etcd_tls
    assert c.tls and c.members[0].client_url.startswith("https://")
    c.put("/tls/k", "v")
    assert c.get("/tls/k") == "v"
    assert c.coordfs_args() == ["--cacert", c.certs.ca, "--cert", c.certs.client_cert,
                                "--key", c.certs.client_key]
    env = dict(os.environ, ETCDCTL_API="3")
    # CA but no client certificate: refused (client-cert-auth)
    r = subprocess.run([harness.ETCDCTL, "--endpoints", c.endpoints, "--cacert", c.certs.ca,
                        "--dial-timeout", "1s", "--command-timeout", "1s", "get", "/tls/k"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    # plain text: refused
    r = subprocess.run([harness.ETCDCTL, "--endpoints", "http://" + c.endpoint, "--dial-timeout", "1s",
                        "--command-timeout", "1s", "get", "/tls/k"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0


def test_tls_with_auth_uses_cert_cn(etcd_factory, tls_certs):
    c = etcd_factory(size=1, tls=True, certs=tls_certs)
    c.enable_auth()
    c.add_user("alice", "pw", prefix="/a/")
    crt, key = tls_certs.client("alice")
    # no --user: etcd takes the user from the certificate's CN
    base = [harness.ETCDCTL, "--endpoints", c.endpoints, "--cacert", tls_certs.ca, "--cert", crt,
            "--key", key]
    env = dict(os.environ, ETCDCTL_API="3")
    r = subprocess.run(base + ["put", "/a/x", "1"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["put", "/b/x", "1"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "permission denied" in r.stderr


def _script(path, body):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return str(path)


def test_build_path_and_run_prog(tmp_path, monkeypatch, etcd):
    monkeypatch.setenv("COORD_BUILD", str(tmp_path))
    (tmp_path / "tests").mkdir()
    prog = _script(tmp_path / "tests" / "echo_env", 'echo "$COORD_ENDPOINTS $1"\n')
    assert harness.build_path("tests/echo_env") == prog
    assert harness.build_path("echo_env") == prog  # bare names are found in tests/
    assert harness.build_path("coordfs") == str(tmp_path / "coordfs")
    assert harness.build_path("examples/config") == str(tmp_path / "examples" / "config")
    assert harness.run_prog("echo_env", "arg", endpoints=etcd).strip() == etcd.endpoints + " arg"
    assert harness.run_prog("tests/echo_env", endpoints="1.2.3.4:5").strip() == "1.2.3.4:5"
    r = harness.run_prog("echo_env", endpoints=etcd, result=True)
    assert r.returncode == 0 and r.stdout.startswith(etcd.endpoints)
    with pytest.raises(ProgError, match="not built"):
        harness.run_prog("tests/nope")


def test_run_prog_failures(tmp_path):
    bad = _script(tmp_path / "bad", "echo out; echo err >&2; exit 3\n")
    with pytest.raises(ProgError, match="exit code 3") as e:
        harness.run_prog(bad)
    assert "out" in e.value.stdout and "err" in e.value.stderr
    assert harness.run_prog(bad, expect_rc=3).strip() == "out"
    assert harness.run_prog(bad, check=False).strip() == "out"
    san = _script(tmp_path / "san", "echo '==1==ERROR: AddressSanitizer: heap-use-after-free' >&2\n")
    with pytest.raises(ProgError, match="sanitizer"):
        harness.run_prog(san)  # a report fails even with exit code 0
    slow = _script(tmp_path / "slow", "exec sleep 30\n")
    t = time.monotonic()
    with pytest.raises(ProgError, match="timed out"):
        harness.run_prog(slow, timeout=0.5)
    assert time.monotonic() - t < 10


def test_start_prog(tmp_path, etcd):
    p = harness.start_prog(_script(tmp_path / "bg", 'echo "$COORD_ENDPOINTS"; exec sleep 30\n'), endpoints=etcd)
    assert p.poll() is None
    rc = harness.end_process(p, signal.SIGTERM)
    assert rc == -signal.SIGTERM
    p = harness.start_prog(_script(tmp_path / "fg", 'echo "$COORD_ENDPOINTS"\n'), endpoints=etcd)
    out, _ = harness.finish_prog(p)
    assert out.strip() == etcd.endpoints


def test_sanitizer_env(monkeypatch):
    monkeypatch.setattr(harness, "SANITIZE", True)
    env = harness.prog_env({}, "127.0.0.1:1")
    assert env["ASAN_OPTIONS"] == "detect_leaks=1:abort_on_error=0"
    assert env["UBSAN_OPTIONS"] == "print_stacktrace=1:halt_on_error=1"
    assert env["COORD_ENDPOINTS"] == "127.0.0.1:1"
    monkeypatch.setattr(harness, "SANITIZE", False)
    assert "ASAN_OPTIONS" not in harness.prog_env({}, None)


def test_mounted_helper(tmp_path):
    assert harness.mounted("/proc")
    assert not harness.mounted(str(tmp_path))


def test_coordfs_mount(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    assert harness.mounted(m.path) and m.is_mounted and m.proc.poll() is None
    assert isinstance(os.listdir(m.path), list)
    m2 = coordfs_mount(etcd.endpoints)  # a plain endpoints string works too
    assert m2.path != m.path and harness.mounted(m2.path)
    rc = m2.unmount()
    assert not harness.mounted(m2.path)
    assert rc == 0, m2.log()
    assert m2.unmount() == 0  # idempotent


def test_coordfs_mount_after_kill_on_same_path(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    m.kill()  # kill -9: the dead mount stays (ENOTCONN)
    m.proc.wait(10)
    assert harness.mounted(m.path)
    with pytest.raises(OSError):
        os.listdir(m.path)
    # a new coordfs on the same path waits for its own mount, not the dead one
    m2 = coordfs_mount(etcd, mountpoint=m.path)
    assert m2.mount_id != m.mount_id and isinstance(os.listdir(m2.path), list)
    assert m2.on_top and m.is_mounted and not m.on_top  # stacked on the dead one
    # the dead one's clean-up leaves the new mount alone
    m.unmount()
    assert m2.on_top and isinstance(os.listdir(m2.path), list)
    # the fixture unmounts m2, then the dead mount under it
    m2.unmount()
    assert m.on_top
    m.unmount()
    assert not harness.mounted(m.path)


# ------------------------------------------------------------------ scripts/run

RUN = os.path.join(harness.REPO, "scripts", "run")


def _port_pair():
    """A free port p whose p+1 is free too (scripts/run uses p+1 for peers)."""
    import socket
    for _ in range(50):
        p = harness.free_port()
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
        finally:
            s.close()
    pytest.skip("no free pair of ports")


class _Run:
    """scripts/run in the background, its output collected by a thread."""

    def __init__(self, tmp_path, port, build, once=False):
        import threading
        self.run_dir = tmp_path / "run"
        self.mnt = tmp_path / "mnt"
        env = dict(os.environ, RUN_PORT=str(port), RUN_DIR=str(self.run_dir), RUN_MNT=str(self.mnt),
                   COORD_BUILD=str(build))
        if once:
            env["RUN_ONCE"] = "1"
        self.p = subprocess.Popen([RUN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.lines = []
        self.t = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stdout.readline, "")),
                                  daemon=True)
        self.t.start()

    @property
    def out(self):
        return "".join(self.lines)

    def wait_for(self, text, timeout=60):
        harness.wait_for(lambda: text in self.out or self.p.poll() is not None, timeout, 0.05,
                         "%r from scripts/run" % text)
        assert text in self.out, self.out

    def interrupt(self, timeout=60):
        harness.signal_pid(self.p, signal.SIGINT)  # what Ctrl-C does: only the script gets it (children use setsid)
        return self.finish(timeout)

    def finish(self, timeout=60):
        try:
            rc = self.p.wait(timeout)
        finally:
            harness.end_process(self.p, signal.SIGKILL)
            self.t.join(10)
        return rc


def _etcd_pid_alive(pid):
    return os.path.exists("/proc/%d" % pid) and not _zombie_or_gone(pid)


def test_run_script_starts_etcd_runs_example_and_stops_on_sigint(tmp_path):
    build = tmp_path / "build"
    (build / "examples").mkdir(parents=True)
    _script(build / "examples" / "config", 'echo "example sees $COORD_ENDPOINTS"\n')
    port = _port_pair()
    r = _Run(tmp_path, port, build)
    try:
        r.wait_for("Press Ctrl-C")
        out = r.out
        assert "starting etcd on 127.0.0.1:%d" % port in out
        assert "example sees localhost:%d" % port in out
        pid = int((r.run_dir / "etcd.pid").read_text())
        assert _etcd_pid_alive(pid)
        ok = subprocess.run([harness.ETCDCTL, "--endpoints", "127.0.0.1:%d" % port, "endpoint", "health"],
                            env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, timeout=30)
        assert ok.returncode == 0
    finally:
        rc = r.interrupt()
    assert rc == 0, r.out
    assert "stopping etcd" in r.out and "run: done" in r.out
    assert not _etcd_pid_alive(pid)
    assert not (r.run_dir / "etcd.pid").exists()
    assert (r.run_dir / "etcd.log").stat().st_size > 0


def test_run_script_uses_running_etcd_and_leaves_it(tmp_path, etcd):
    port = etcd.members[0].client_port
    r = _Run(tmp_path, port, tmp_path / "nobuild", once=True)  # no coordfs, no examples
    rc = r.finish()
    assert rc == 0, r.out
    assert "using the etcd that already answers at localhost:%d" % port in r.out
    assert "$ etcdctl put /config/app" in r.out and "holding /locks/deploy" in r.out
    assert "stopping etcd" not in r.out
    assert etcd.members[0].health() and etcd.get("/config/app") == '{"port": 8080}'


def test_run_script_mounts_coordfs(tmp_path):
    build = harness.build_dir()
    if not harness.have_build("coordfs"):
        pytest.skip("coordfs not built")
    port = _port_pair()
    r = _Run(tmp_path, port, build)
    try:
        r.wait_for("Press Ctrl-C", timeout=90)
        assert harness.mounted(str(r.mnt)), r.out
        assert isinstance(os.listdir(r.mnt), list)
    finally:
        rc = r.interrupt(timeout=90)
    assert rc == 0, r.out
    assert "unmounting" in r.out
    assert not harness.mounted(str(r.mnt))
