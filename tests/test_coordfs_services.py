"""test_coordfs_services.py — /services on a real coordfs mount.

Listing names, ids and instance JSON; registration by writing a valid
instance document and keeping the file open: visible to etcdctl while the
descriptor is open, gone within 100 ms of its close and of SIGKILL of the
writer; an invalid document gives EINVAL and no key; lease expiry after
--service-ttl when coordfs itself dies.
"""

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from harness import wait_for


@pytest.fixture
def fs(etcd, coordfs_mount):
    return coordfs_mount(etcd)


def S(m, *parts):
    return os.path.join(m.path, "services", *parts)


class DeleteWatch:
    """`etcdctl watch` on a key, started (and given time to connect) before
    the action, so that the time to the DELETE event is measured without
    etcdctl's own start-up."""

    def __init__(self, etcd, key):
        self.p = subprocess.Popen(etcd.etcdctl_argv() + ["watch", key], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def seconds_until_delete(self, t0, timeout=5):
        fd = self.p.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"DELETE" not in buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0, left))
            if not r:
                raise AssertionError("no DELETE within %ss: %r" % (timeout, buf))
            buf += os.read(fd, 4096)
        return time.monotonic() - t0

    def close(self):
        self.p.kill()
        self.p.wait()


def test_list_names_ids_and_json(etcd, fs):
    doc = {"id": "c1", "name": "chat", "address": "10.0.0.1", "port": 80}
    etcd.put("/services/chat/c1", json.dumps(doc))
    etcd.put("/services/chat/c2", json.dumps(dict(doc, id="c2")))
    etcd.put("/services/web/w1", json.dumps(dict(doc, id="w1", name="web")))
    wait_for(lambda: sorted(os.listdir(S(fs))) == ["chat", "web"], 5, what="service names")
    assert sorted(os.listdir(S(fs, "chat"))) == ["c1", "c2"]
    with open(S(fs, "chat", "c1")) as f:
        assert json.load(f) == doc


def test_register_while_open_and_gone_on_close(etcd, fs):
    p = S(fs, "chat", "chat-1")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, b'{"address":"10.0.0.5","port":8080}\n')
    v = json.loads(etcd.get("/services/chat/chat-1"))
    assert v["address"] == "10.0.0.5" and v["port"] == 8080
    assert v["id"] == "chat-1" and v["name"] == "chat"
    lease = etcd.etcdctl_json("get", "/services/chat/chat-1")["kvs"][0]["lease"]
    assert lease != 0
    assert "chat-1" in os.listdir(S(fs, "chat"))
    time.sleep(0.3)
    assert etcd.get("/services/chat/chat-1") is not None
    w = DeleteWatch(etcd, "/services/chat/chat-1")
    try:
        t0 = time.monotonic()
        os.close(fd)  # the release after the last close revokes the lease
        assert w.seconds_until_delete(t0) < 0.1
    finally:
        w.close()
    wait_for(lambda: "chat-1" not in os.listdir(S(fs, "chat")), 5, what="gone from listing")


def test_shell_registration_idiom(etcd, fs):
    p = S(fs, "api", "api-1")
    r = subprocess.run(["bash", "-c", "exec 3>%s; echo '{\"address\":\"127.0.0.1\",\"port\":9}' >&3; "
                        "etcdctl --endpoints %s get --print-value-only /services/api/api-1; exec 3>&-"
                        % (p, etcd.endpoints)], stdout=subprocess.PIPE, text=True, timeout=30)
    assert json.loads(r.stdout.strip())["port"] == 9
    wait_for(lambda: etcd.get("/services/api/api-1") is None, 2, interval=0.005, what="gone after exec 3>&-")


def test_gone_within_100ms_of_sigkill(etcd, fs):
    p = S(fs, "chat", "k1")
    prog = ("import os,sys,time\n"
            "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC)\n"
            "os.write(fd, b'{\"address\":\"10.0.0.9\",\"port\":1}')\n"
            "print('registered', flush=True)\n"
            "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", prog, p], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "registered"
        assert etcd.get("/services/chat/k1") is not None
        w = DeleteWatch(etcd, "/services/chat/k1")
        try:
            t0 = time.monotonic()
            child.send_signal(signal.SIGKILL)
            assert w.seconds_until_delete(t0) < 0.1
        finally:
            w.close()
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_invalid_document_einval_and_no_key(etcd, fs):
    for bad in [b'{"address":"x"}', b'{"port":80}', b'{"address":"x","port":70000}', b'[1,2]',
                b'not json at all', b'{"address":"x","port":1,"id":"other"}',
                b'{"address":"x","port":1,"name":"other"}']:
        fd = os.open(S(fs, "chat", "bad"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with pytest.raises(OSError) as e:
            os.write(fd, bad)
        assert e.value.errno == errno.EINVAL, bad
        os.close(fd)
        assert etcd.get("/services/chat/bad") is None, bad
    # an incomplete document fails the close
    fd = os.open(S(fs, "chat", "bad"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, b'{"address":"x",')
    with pytest.raises(OSError) as e:
        os.close(fd)
    assert e.value.errno == errno.EINVAL
    assert etcd.get_prefix("/services/") == {}
    r = subprocess.run(["bash", "-c", "echo '{\"address\":\"x\"}' > %s" % S(fs, "chat", "bad")],
                       stderr=subprocess.PIPE, text=True)
    assert r.returncode != 0 and "Invalid argument" in r.stderr


def test_document_in_pieces(etcd, fs):
    fd = os.open(S(fs, "chat", "p1"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b'{"address": "10.1.1.1",')
        assert etcd.get("/services/chat/p1") is None
        os.write(fd, b' "port": 443, "metadata": {"zone": "a"}}')
        v = json.loads(etcd.get("/services/chat/p1"))
        assert v["metadata"] == {"zone": "a"} and v["port"] == 443
    finally:
        os.close(fd)


def test_lease_expires_after_service_ttl_when_coordfs_dies(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "--service-ttl", "2")
    prog = ("import os,sys,time\n"
            "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC)\n"
            "os.write(fd, b'{\"address\":\"10.0.0.9\",\"port\":1}')\n"
            "print('registered', flush=True)\n"
            "time.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", prog, S(m, "ttl", "t1")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "registered"
        lease = etcd.etcdctl_json("get", "/services/ttl/t1")["kvs"][0]["lease"]
        ttl = etcd.etcdctl_json("lease", "timetolive", "%x" % lease)["granted-ttl"]
        assert ttl <= 3
        m.kill()  # SIGKILL coordfs: nobody revokes the lease
        time.sleep(1)
        assert etcd.get("/services/ttl/t1") is not None
        wait_for(lambda: etcd.get("/services/ttl/t1") is None, 10, what="lease expiry")
    finally:
        child.kill()
        child.wait()


def test_registered_again_after_lease_loss(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "--service-ttl", "3")
    fd = os.open(S(m, "chat", "again"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b'{"address":"10.0.0.7","port":7}')
        lease = etcd.etcdctl_json("get", "/services/chat/again")["kvs"][0]["lease"]
        etcd.etcdctl("lease", "revoke", "%x" % lease)  # as if it had expired
        # (the key's DELETE is put back at once: it may already be there)

        def back():
            r = etcd.etcdctl_json("get", "/services/chat/again").get("kvs")
            return r and r[0]["lease"] != lease
        wait_for(back, 15, what="registered again under a new lease")
    finally:
        os.close(fd)
    wait_for(lambda: etcd.get("/services/chat/again") is None, 2, what="gone after close")


def test_sigterm_while_registering_again_with_etcd_down(etcd, coordfs_mount):
    """etcd is gone for longer than the TTL, so the lease is lost and a
    re-registration thread keeps trying; SIGTERM then ends coordfs, which
    waits for that thread before closing its client (the thread used the
    client after coord_close before): exit 0, no sanitizer report."""
    m = coordfs_mount(etcd, "--service-ttl", "2", "--timeout", "1s")
    fd = os.open(S(m, "chat", "down"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b'{"address":"10.0.0.9","port":9}')
        assert etcd.get("/services/chat/down") is not None
        etcd.kill(etcd.members[0])
        # lost locally after the TTL; then grants fail and are retried each second
        wait_for(lambda: "chat/down lost: registering it again" in m.log(), 15, what="the lease lost")
        time.sleep(2)  # a grant or two failed, the thread is between attempts
        t0 = time.monotonic()
        m.kill(signal.SIGTERM)
        rc = m.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        try:
            os.close(fd)
        except OSError as e:  # the FLUSH after coordfs has gone
            assert e.errno == errno.ENOTCONN, e
    assert rc == 0, m.log()[-3000:]
    assert took < 20, "coordfs took %.1fs to end" % took
    m.unmount()
    m.check()


# ---------------------------------------------------------------- issue 13: rm and deletes of a live registration

DOC = '{"address":"10.0.0.5","port":8080}'


class ShellOwner:
    """A bash that registers an instance with the shell idiom (`exec 3>`,
    `echo ... >&3`) and keeps fd 3 open until close()."""

    def __init__(self, path, doc=DOC):
        script = "exec 3>%s && echo '%s' >&3 && echo registered && read line; exec 3>&-; echo closed" % (path, doc)
        self.p = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().strip()
        assert line == "registered", (line, self.p.stderr.read() if self.p.poll() is not None else "")

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.write("done\n")
            self.p.stdin.flush()
            assert self.p.stdout.readline().strip() == "closed"
        self.p.wait(10)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)


def instance(etcd, key):
    """(value, lease) of key in etcd, or (None, None)."""
    kvs = etcd.etcdctl_json("get", key).get("kvs")
    if not kvs:
        return None, None
    import base64
    return base64.b64decode(kvs[0]["value"]).decode(), kvs[0]["lease"]


def test_rm_of_a_registration_held_open_on_this_mount_is_ebusy(etcd, fs):
    p = S(fs, "api", "a1")
    owner = ShellOwner(p)
    try:
        value, lease = instance(etcd, "/services/api/a1")
        assert json.loads(value)["port"] == 8080 and lease
        r = subprocess.run(["rm", p], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert r.returncode != 0 and "Device or resource busy" in r.stderr, r
        r = subprocess.run(["rm", "-f", p], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert r.returncode != 0 and "Device or resource busy" in r.stderr, r
        time.sleep(0.5)  # nothing was deleted, nothing comes back later either
        assert instance(etcd, "/services/api/a1") == (value, lease)
        assert "a1" in os.listdir(S(fs, "api"))
        # the log says who holds it (the bash, by its pid)
        assert "rm /services/api/a1: EBUSY" in fs.log() and "pid %d" % owner.p.pid in fs.log(), fs.log()[-2000:]
    finally:
        owner.close()
    wait_for(lambda: etcd.get("/services/api/a1") is None, 2, what="gone after exec 3>&-")
    # with no registration open, rm deletes as before
    etcd.put("/services/api/a2", DOC)
    wait_for(lambda: os.path.exists(S(fs, "api", "a2")), 5, what="a2 seen")
    subprocess.run(["rm", S(fs, "api", "a2")], check=True)
    assert etcd.get("/services/api/a2") is None


def test_deleted_by_etcdctl_while_open_is_registered_again(etcd, fs):
    owner = ShellOwner(S(fs, "api", "a1"))
    try:
        value, lease = instance(etcd, "/services/api/a1")
        etcd.etcdctl("del", "/services/api/a1")
        t0 = time.monotonic()
        # back with the same document, under the same lease (it still lives: no lease leaks)
        wait_for(lambda: instance(etcd, "/services/api/a1")[0] is not None, 5, interval=0.05,
                 what="registered again")
        assert time.monotonic() - t0 < 5
        assert instance(etcd, "/services/api/a1") == (value, lease)
        leases = etcd.etcdctl_json("lease", "list").get("leases") or []
        assert [int(l["id"]) for l in leases] == [lease]
        assert "/services/api/a1 deleted at revision" in fs.log()
        # a second delete is put back too
        etcd.etcdctl("del", "/services/api/a1")
        wait_for(lambda: instance(etcd, "/services/api/a1") == (value, lease), 5, interval=0.05,
                 what="registered again after a second delete")
        wait_for(lambda: "a1" in os.listdir(S(fs, "api")), 5, what="listed again")
    finally:
        owner.close()
    # the owner's own close deletes it for good
    wait_for(lambda: etcd.get("/services/api/a1") is None, 2, what="gone after close")
    time.sleep(1.5)
    assert etcd.get("/services/api/a1") is None
    assert not (etcd.etcdctl_json("lease", "list").get("leases") or [])


def test_deleted_after_lease_revoked_registered_under_new_lease(etcd, fs):
    """The key and its lease both gone (etcdctl lease revoke): the delete is
    seen first and put back under a new lease; the dead one is not used."""
    owner = ShellOwner(S(fs, "api", "a3"))
    try:
        value, lease = instance(etcd, "/services/api/a3")
        etcd.etcdctl("lease", "revoke", "%x" % lease)

        def back():
            v, l = instance(etcd, "/services/api/a3")
            return v == value and l and l != lease
        wait_for(back, 10, what="registered again under a new lease")
    finally:
        owner.close()
    wait_for(lambda: etcd.get("/services/api/a3") is None, 2, what="gone after close")
    time.sleep(1)
    assert etcd.get("/services/api/a3") is None


def test_rm_on_another_mount_is_registered_again(etcd, coordfs_mount):
    m1 = coordfs_mount(etcd)
    m2 = coordfs_mount(etcd)
    owner = ShellOwner(S(m1, "api", "a1"))
    try:
        value, lease = instance(etcd, "/services/api/a1")
        wait_for(lambda: os.path.exists(S(m2, "api", "a1")), 5, what="seen on the second mount")
        r = subprocess.run(["rm", S(m2, "api", "a1")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert r.returncode == 0, r.stderr  # that mount holds nothing: it deletes
        wait_for(lambda: instance(etcd, "/services/api/a1") == (value, lease), 5, interval=0.05,
                 what="registered again by its owner's mount")
        wait_for(lambda: os.path.exists(S(m2, "api", "a1")), 5, what="back on the second mount")
    finally:
        owner.close()
    wait_for(lambda: etcd.get("/services/api/a1") is None, 2, what="gone after close")
    time.sleep(1)
    assert etcd.get("/services/api/a1") is None


def test_rewritten_document_is_the_one_put_back(etcd, fs):
    fd = os.open(S(fs, "api", "w1"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b'{"address":"10.0.0.1","port":1}')
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, b'{"address":"10.0.0.2","port":2}')
        assert json.loads(etcd.get("/services/api/w1"))["port"] == 2
        etcd.etcdctl("del", "/services/api/w1")
        wait_for(lambda: etcd.get("/services/api/w1") is not None, 5, what="registered again")
        assert json.loads(etcd.get("/services/api/w1"))["address"] == "10.0.0.2"
    finally:
        os.close(fd)
    wait_for(lambda: etcd.get("/services/api/w1") is None, 2, what="gone after close")


# ---------------------------------------------------------------- issue 13: why a document is invalid

@pytest.mark.parametrize("doc,reason", [
    ('{"address":"x","port":0}', '"port" 0 out of range 1..65535'),
    ('{"address":"x","port":70000}', '"port" 70000 out of range 1..65535'),
    ('{"address":"x","port":"80"}', '"port" is not an integer'),
    ('{"port":80}', '"address" missing'),
    ('{"address":"","port":80}', '"address" is not a non-empty string'),
    ('not json', 'not JSON at byte'),
    ('{"address":"x","port":1} trailing', 'not JSON at byte'),
    ('[1,2]', 'not a JSON object'),
    ('{"address":"x","port":1,"id":"other"}', '"id" disagrees with the path: must be "i1"'),
    ('{"address":"x","port":1,"name":"other"}', '"name" disagrees with the path: must be "s"'),
    ('{"address":"x","port":1,"metadata":[1]}', '"metadata" is not an object'),
])
def test_invalid_document_reason_is_logged(etcd, fs, doc, reason):
    path = S(fs, "s", "i1")
    r = subprocess.run(["bash", "-c", "echo '%s' > %s" % (doc, path)], stderr=subprocess.PIPE, text=True)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert etcd.get("/services/s/i1") is None
    lines = [l for l in fs.log().splitlines() if "/services/s/i1: invalid instance document" in l]
    assert len(lines) == 1, lines  # once per failed write
    assert reason in lines[0] and "warning" in lines[0], lines[0]


def test_incomplete_document_reason_is_logged_at_close(etcd, fs):
    fd = os.open(S(fs, "s", "i2"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, b'{"address":"x",')
    with pytest.raises(OSError) as e:
        os.close(fd)
    assert e.value.errno == errno.EINVAL
    lines = [l for l in fs.log().splitlines() if "/services/s/i2: invalid instance document" in l]
    assert len(lines) == 1 and "incomplete JSON at close" in lines[0], lines
