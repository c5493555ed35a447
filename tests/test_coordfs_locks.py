"""test_coordfs_locks.py — coordfs /locks against a real etcd and a real mount.

Locks are taken the way scripts take them: flock(1) on /mnt/locks/<name>
(the flock(2) op), `exec 9>/mnt/locks/<name>` (open for write), and
os.open(O_WRONLY) from Python.  Checked: mutual exclusion with a
non-atomic read-increment-write (flock and exec, one mount and two mounts),
interop with `etcdctl lock` both ways, FIFO order, flock -n / -w, interrupted
and killed waiters leaving no key, a killed holder, 200 waiters that do not
block the file system, a revoked lease (lost lock: EIO on write/read/poll),
kill -9 of coordfs (lock freed after --lock-ttl), --lock-ttl renewal, the
JSON read, notes, listing and refused names.
"""

import base64
import errno
import fcntl
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

import harness
from harness import end_process, wait_for

SLOW = 3.0 if harness.SANITIZE else 1.0


def keys(etcd, prefix="/locks/"):
    """Keys under prefix, in create-revision order."""
    r = etcd.etcdctl_json("get", "--prefix", prefix, "--keys-only", "--sort-by=CREATE", "--order=ASCEND")
    return [base64.b64decode(kv["key"]).decode() for kv in r.get("kvs") or []]


def wait_keys(etcd, n, prefix="/locks/", timeout=20.0):
    return wait_for(lambda: len(keys(etcd, prefix)) == n, timeout * SLOW, 0.05,
                    "%d keys under %s (have %s)" % (n, prefix, keys(etcd, prefix)))


def popen(argv, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    return harness._popen(argv, **kw)


def hold(path, note=None):
    """A Python process that opens path for writing (taking the lock),
    prints HELD, optionally writes a note, then sleeps until killed."""
    code = ("import os,sys,time\n"
            "fd=os.open(sys.argv[1], os.O_WRONLY)\n"
            "if len(sys.argv)>2: os.write(fd, sys.argv[2].encode())\n"
            "print('HELD', flush=True)\n"
            "time.sleep(600)\n")
    argv = [sys.executable, "-c", code, path] + ([note] if note is not None else [])
    p = popen(argv, stdout=subprocess.PIPE, text=True)
    q = queue.Queue()

    def pump():
        for line in p.stdout:
            q.put(line.strip())
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    p.lines = q
    return p


def expect_held(p, timeout=20.0):
    assert p.lines.get(timeout=timeout * SLOW) == "HELD"


def not_held_yet(p, wait=0.5):
    with pytest.raises(queue.Empty):
        p.lines.get(timeout=wait)


def etcdctl_lock(etcd, name):
    """`etcdctl lock NAME`: prints its key once held, holds until SIGTERM."""
    env = dict(os.environ)
    env["ETCDCTL_API"] = "3"
    p = popen(etcd.etcdctl_argv() + ["lock", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              text=True, env=env, start_new_session=True)
    q = queue.Queue()

    def pump():
        for line in p.stdout:
            q.put(line.strip())
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return p, q


def run(argv, timeout=60.0, **kw):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout * SLOW, **kw)


COUNTER_FLOCK = r'''
for i in $(seq "$N"); do
  flock "$L" sh -c 'n=$(cat "$C"); sleep 0.001; echo $((n+1)) > "$C"' || exit 1
done
'''

COUNTER_EXEC = r'''
for i in $(seq "$N"); do
  exec 9>"$L" || exit 1
  n=$(cat "$C"); sleep 0.001; echo $((n+1)) > "$C"
  exec 9>&-
done
'''


def run_counters(script, locks, counter, procs, iters):
    """procs shells (spread over the lock paths in `locks`) each doing iters
    locked increments of the plain file counter; returns the final count."""
    with open(counter, "w") as f:
        f.write("0\n")
    ps = []
    for i in range(procs):
        env = dict(os.environ, L=locks[i % len(locks)], C=counter, N=str(iters))
        ps.append(popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in ps:
        out, err = p.communicate(timeout=180 * SLOW)
        assert p.returncode == 0, err
    with open(counter) as f:
        return int(f.read())


# ------------------------------------------------------------------ mutual exclusion


@pytest.mark.timeout(300)
def test_flock_counter_10x20(etcd, coordfs_mount, tmp_path):
    m = coordfs_mount(etcd)
    n = run_counters(COUNTER_FLOCK, [m.join("locks", "x")], str(tmp_path / "count"), 10, 20)
    assert n == 200
    wait_keys(etcd, 0)


@pytest.mark.timeout(300)
def test_exec_counter_10x20(etcd, coordfs_mount, tmp_path):
    m = coordfs_mount(etcd)
    n = run_counters(COUNTER_EXEC, [m.join("locks", "x")], str(tmp_path / "count"), 10, 20)
    assert n == 200
    wait_keys(etcd, 0)


@pytest.mark.timeout(300)
def test_two_mounts_exclude_each_other(etcd, coordfs_mount, tmp_path):
    a = coordfs_mount(etcd)
    b = coordfs_mount(etcd)
    locks = [a.join("locks", "x"), b.join("locks", "x")]
    assert run_counters(COUNTER_FLOCK, locks, str(tmp_path / "c1"), 6, 10) == 60
    assert run_counters(COUNTER_EXEC, locks, str(tmp_path / "c2"), 6, 10) == 60
    # and a holder on one mount keeps the other out
    h = hold(a.join("locks", "y"))
    expect_held(h)
    assert run(["flock", "-n", b.join("locks", "y"), "true"]).returncode == 1
    w = hold(b.join("locks", "y"))
    not_held_yet(w, 1.0)
    end_process(h, signal.SIGKILL)
    expect_held(w, 5)
    end_process(w, signal.SIGKILL)
    wait_keys(etcd, 0)


def test_etcdctl_lock_excludes_coordfs(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    path = m.join("locks", "x")
    p, q = etcdctl_lock(etcd, "/locks/x")
    try:
        key = q.get(timeout=10 * SLOW)
        assert key and key.startswith("/locks/x/"), key
        t = time.monotonic()
        assert run(["flock", "-n", path, "true"]).returncode == 1
        assert time.monotonic() - t < 2 * SLOW
        w = popen(["flock", path, "-c", "echo GOT"], stdout=subprocess.PIPE, text=True)
        wait_keys(etcd, 2)
        time.sleep(0.5)
        assert w.poll() is None  # still waiting behind etcdctl
        info = json.loads(open(path).read())
        assert info["holder"] == key and info["waiters"] == 1 and not info["held_by_me"]
    finally:
        end_process(p, signal.SIGTERM)  # etcdctl unlocks on SIGTERM
    out, _ = w.communicate(timeout=10 * SLOW)
    assert w.returncode == 0 and out.strip() == "GOT"
    wait_keys(etcd, 0)


def test_coordfs_excludes_etcdctl_lock(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    fd = os.open(m.join("locks", "x"), os.O_WRONLY)
    try:
        mine = keys(etcd)
        assert len(mine) == 1 and mine[0].startswith("/locks/x/")
        p, q = etcdctl_lock(etcd, "/locks/x")
        wait_keys(etcd, 2)
        with pytest.raises(queue.Empty):
            q.get(timeout=1.0)  # etcdctl waits
    finally:
        os.close(fd)
    try:
        line = q.get(timeout=10 * SLOW)
        assert line and line.startswith("/locks/x/") and line != mine[0], line
        # now coordfs waits for etcdctl
        assert run(["flock", "-n", m.join("locks", "x"), "true"]).returncode == 1
    finally:
        end_process(p, signal.SIGTERM)
    wait_keys(etcd, 0)


# ------------------------------------------------------------------ queue behaviour


def test_fifo_order(etcd, coordfs_mount, tmp_path):
    m = coordfs_mount(etcd)
    path = m.join("locks", "q")
    order = str(tmp_path / "order")
    h = hold(path)
    expect_held(h)
    ws = []
    for i in range(6):
        ws.append(popen(["flock", path, "-c", "echo %d >> %s" % (i, order)]))
        wait_keys(etcd, i + 2)  # queued before the next one starts
    info = json.loads(open(path).read())
    assert info["waiters"] == 6
    end_process(h, signal.SIGKILL)
    for w in ws:
        assert w.wait(20 * SLOW) == 0
    with open(order) as f:
        assert [int(x) for x in f.read().split()] == list(range(6))
    wait_keys(etcd, 0)


def test_flock_n_and_w(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    path = m.join("locks", "x")
    h = hold(path)
    expect_held(h)
    held = keys(etcd)
    t = time.monotonic()
    r = run(["flock", "-n", path, "true"])
    assert r.returncode == 1
    assert time.monotonic() - t < 1.0 * SLOW
    t = time.monotonic()
    r = run(["flock", "-w", "1", path, "true"])
    took = time.monotonic() - t
    assert r.returncode == 1
    assert 0.9 <= took < 3.0 * SLOW, took
    assert keys(etcd) == held  # the withdrawn waiter left no key
    # O_NONBLOCK open: EAGAIN at once
    with pytest.raises(OSError) as e:
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert e.value.errno == errno.EAGAIN
    assert keys(etcd) == held
    end_process(h, signal.SIGKILL)
    wait_keys(etcd, 0)
    # free: -n and O_NONBLOCK succeed, the second right after the first's exit
    assert run(["flock", "-n", path, "true"]).returncode == 0
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert len(keys(etcd)) == 1
    os.close(fd)
    wait_keys(etcd, 0)


def test_try_right_after_own_close_never_finds_it_held(etcd, coordfs_mount):
    """The kernel sends FUSE_RELEASE without waiting for it, so close()
    (or exit) returns before the key is deleted, and the next request can
    even reach coordfs first.  A try on the same mount must still find the
    lock free (it used to fail with EAGAIN about one time in three here);
    while another descriptor keeps the lock, a try still fails."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "again")
    for i in range(100):
        os.close(os.open(path, os.O_WRONLY))
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # EAGAIN would raise
    for i in range(100):
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    for i in range(20):  # as a shell script does it: one process after the other
        assert run(["flock", "-n", path, "true"]).returncode == 0, i
    # a closed descriptor whose open file stays open elsewhere keeps the lock
    fd = os.open(path, os.O_WRONLY)
    fd2 = os.dup(fd)
    os.close(fd)
    with pytest.raises(OSError) as e:
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert e.value.errno == errno.EAGAIN
    assert run(["flock", "-n", path, "true"]).returncode == 1
    os.close(fd2)
    wait_keys(etcd, 0)


def test_flock_u_and_shared_fd(etcd, coordfs_mount):
    """flock -u releases; flock on an fd whose open already holds is a no-op;
    opening for read takes nothing."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "u")
    script = ('exec 8<"$L"; flock 8; echo LOCKED; read x; flock -u 8; echo UNLOCKED; read x; '
              'exec 9>"$L"; flock 9; echo AGAIN; read x; exit 0')
    p = popen(["bash", "-c", script], env=dict(os.environ, L=path), stdin=subprocess.PIPE,
              stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "LOCKED"
    assert len(keys(etcd)) == 1
    assert run(["flock", "-n", path, "true"]).returncode == 1
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "UNLOCKED"
    assert keys(etcd) == []  # released before flock -u returned
    assert run(["flock", "-n", path, "true"]).returncode == 0
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "AGAIN"
    assert len(keys(etcd)) == 1
    p.stdin.close()
    assert p.wait(10 * SLOW) == 0
    wait_keys(etcd, 0)
    # a read-only open is not a lock
    with open(path) as f:
        assert json.loads(f.read())["holder"] is None
        assert keys(etcd) == []


def test_interrupted_open_leaves_no_key(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    path = m.join("locks", "i")
    h = hold(path)
    expect_held(h)
    held = keys(etcd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        w = hold(path)
        wait_keys(etcd, 2)
        t = time.monotonic()
        w.send_signal(sig)
        w.wait(5 * SLOW)
        assert time.monotonic() - t < 2 * SLOW
        wait_keys(etcd, 1, timeout=2)
        assert keys(etcd) == held
    end_process(h, signal.SIGKILL)
    wait_keys(etcd, 0)


@pytest.mark.timeout(180)
def test_many_waiters_give_up_around_the_release(etcd, coordfs_mount, tmp_path):
    """30 `flock -w` waiters whose timeouts fall around the moment the holder
    lets go (interrupt and grant race): each either ran its command or gave
    up, the lock was never held twice, and no key is left."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "race")
    log = str(tmp_path / "log")
    h = hold(path)
    expect_held(h)
    ws = []
    for i in range(30):
        w = "%.2f" % (0.8 + 0.02 * i)  # 0.8 .. 1.38 s
        cmd = "echo in >> %s; sleep 0.01; echo out >> %s" % (log, log)
        ws.append(popen(["flock", "-w", w, path, "-c", cmd]))
    time.sleep(1.0)
    end_process(h, signal.SIGKILL)  # lets go while the timeouts fire
    rcs = [w.wait(60 * SLOW) for w in ws]
    assert set(rcs) <= {0, 1}, rcs
    lines = open(log).read().split() if os.path.exists(log) else []
    assert lines == ["in", "out"] * rcs.count(0)  # never two holders at once
    wait_keys(etcd, 0, timeout=5)
    assert run(["flock", "-n", path, "true"]).returncode == 0


# ------------------------------------------------------------------ killed processes


def test_sigkill_holder_next_waiter_promptly(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    path = m.join("locks", "k")
    h = hold(path)
    expect_held(h)
    w = hold(path)
    wait_keys(etcd, 2)
    not_held_yet(w, 0.3)
    t = time.monotonic()
    os.kill(h.pid, signal.SIGKILL)
    expect_held(w, 2)
    took = time.monotonic() - t
    assert took < 2.0 * SLOW, took
    h.wait(5)
    assert len(keys(etcd)) == 1
    end_process(w, signal.SIGKILL)
    wait_keys(etcd, 0)


def test_sigkill_waiter_leaves_no_key(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    path = m.join("locks", "k")
    h = hold(path)
    expect_held(h)
    w1 = popen(["flock", path, "true"])  # a pending flock(2)
    wait_keys(etcd, 2)
    w2 = hold(path)  # a pending open
    wait_keys(etcd, 3)
    w3 = hold(path)
    wait_keys(etcd, 4)
    w1_key, w2_key = keys(etcd)[1:3]
    os.kill(w1.pid, signal.SIGKILL)
    w1.wait(5 * SLOW)
    wait_keys(etcd, 3, timeout=2)
    assert w1_key not in keys(etcd)
    os.kill(w2.pid, signal.SIGKILL)
    w2.wait(5 * SLOW)
    wait_keys(etcd, 2, timeout=2)
    assert w2_key not in keys(etcd)
    end_process(h, signal.SIGKILL)
    expect_held(w3, 5)  # the queue moved on past the dead waiters
    end_process(w3, signal.SIGKILL)
    wait_keys(etcd, 0)


@pytest.mark.timeout(400)
def test_200_waiters_do_not_block_the_fs(etcd, coordfs_mount, tmp_path):
    m = coordfs_mount(etcd)
    path = m.join("locks", "big")
    granted = str(tmp_path / "granted")
    h = hold(path)
    expect_held(h)
    n = 200
    ws = []
    for i in range(n):
        ws.append(popen(["flock", path, "-c", "echo %d >> %s" % (i, granted)]))
    wait_keys(etcd, n + 1, timeout=120)
    # everything else still answers at once, with 200 requests pending
    for _ in range(3):
        t = time.monotonic()
        os.stat(m.join("status"))
        with open(m.join("status")) as f:
            json.loads(f.read())
        os.stat(m.join("locks", "other"))
        assert "big" in os.listdir(m.join("locks"))
        info = json.loads(open(path).read())
        assert info["waiters"] == n
        assert run(["flock", "-n", m.join("locks", "other"), "true"]).returncode == 0
        took = time.monotonic() - t
        assert took < 2.0 * SLOW, took
        wait_keys(etcd, 0, prefix="/locks/other/")  # released asynchronously after flock exited
    end_process(h, signal.SIGKILL)
    for w in ws:
        assert w.wait(180 * SLOW) == 0
    with open(granted) as f:
        got = sorted(int(x) for x in f.read().split())
    assert got == list(range(n))  # each once
    wait_keys(etcd, 0, timeout=30)


# ------------------------------------------------------------------ lost lock and TTL


def test_revoked_lease_fails_holder_and_frees_lock(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    path = m.join("locks", "r")
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.write(fd, b"owner-1") == 7
        info = json.loads(open(path).read())
        assert info["holder_note"] == "owner-1"
        key = keys(etcd)[0]
        w = popen(["flock", path, "-c", "echo GOT"], stdout=subprocess.PIPE, text=True)
        wait_keys(etcd, 2)
        lease_hex = key.rsplit("/", 1)[1]
        etcd.etcdctl("lease", "revoke", lease_hex)
        out, _ = w.communicate(timeout=10 * SLOW)
        assert w.returncode == 0 and out.strip() == "GOT"  # the next waiter got in

        def write_fails():
            try:
                os.write(fd, b"more")
                return False
            except OSError as e:
                assert e.errno == errno.EIO
                return True
        wait_for(write_fails, 5 * SLOW, 0.05, "the holder's write to fail")
        with pytest.raises(OSError) as e:
            os.pread(fd, 100, 0)
        assert e.value.errno == errno.EIO
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLOUT)
        evs = p.poll(1000)
        assert evs and evs[0][1] & select.POLLERR
    finally:
        try:
            os.close(fd)
        except OSError as e:
            assert e.errno == errno.EIO  # flush reports the loss too
    wait_keys(etcd, 0)


def test_read_after_loss_fails(etcd, coordfs_mount):
    """The first operation after the loss is a read: EIO, then write too."""
    m = coordfs_mount(etcd)
    fd = os.open(m.join("locks", "rd"), os.O_RDWR)
    try:
        assert json.loads(os.pread(fd, 65536, 0))["held_by_me"] is True
        key = keys(etcd)[0]
        etcd.etcdctl("lease", "revoke", key.rsplit("/", 1)[1])

        def read_fails():
            try:
                os.pread(fd, 65536, 0)
                return False
            except OSError as e:
                assert e.errno == errno.EIO
                return True
        wait_for(read_fails, 5 * SLOW, 0.01, "the holder's read to fail")
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EIO
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    wait_keys(etcd, 0)


def test_poll_wakes_on_loss(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    path = m.join("locks", "p")
    fd = os.open(path, os.O_RDWR)
    try:
        key = keys(etcd)[0]
        result = []

        def poller():
            p = select.epoll()
            p.register(fd, select.EPOLLERR | select.EPOLLET | select.EPOLLIN)
            result.append(p.poll(10))
            result.append(p.poll(10))
        t = threading.Thread(target=poller)
        t.start()
        time.sleep(0.3)
        etcd.etcdctl("lease", "revoke", key.rsplit("/", 1)[1])
        t.join(15)
        assert any(ev & select.EPOLLERR for evs in result for _, ev in evs), result
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.mark.timeout(120)
def test_kill_coordfs_lock_freed_after_ttl(etcd, coordfs_mount):
    a = coordfs_mount(etcd, "--lock-ttl", "2s")
    b = coordfs_mount(etcd, "--lock-ttl", "2s")
    h = hold(a.join("locks", "t"))
    expect_held(h)
    key = keys(etcd)[0]
    assert 0 < int(etcd.etcdctl_json("lease", "timetolive", key.rsplit("/", 1)[1])["granted-ttl"]) <= 2
    w = hold(b.join("locks", "t"))
    wait_keys(etcd, 2)
    t = time.monotonic()
    a.kill(signal.SIGKILL)
    expect_held(w, 15)
    took = time.monotonic() - t
    assert 0.3 < took < 8 * SLOW, took
    end_process(h, signal.SIGKILL)  # its file is on the dead mount
    end_process(w, signal.SIGKILL)
    wait_keys(etcd, 0)


def test_lock_ttl_renewed_while_held(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "--lock-ttl", "2s")
    path = m.join("locks", "long")
    fd = os.open(path, os.O_WRONLY)
    try:
        key = keys(etcd)[0]
        time.sleep(5)  # > 2 TTLs
        assert keys(etcd) == [key]
        os.write(fd, b"still mine")
        info = json.loads(open(path).read())
        assert info["holder"] == key and info["holder_note"] == "still mine"
        assert 0 < info["ttl_ms"] <= 2000
    finally:
        os.close(fd)
    wait_keys(etcd, 0)


# ------------------------------------------------------------------ the files themselves


def test_read_note_list_and_names(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    locks = m.join("locks")
    assert os.listdir(locks) == []
    path = os.path.join(locks, "deploy")
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, b"deploying v2 ")
        os.write(fd, b"from ci")
        (key,) = keys(etcd)
        assert etcd.get(key) == "deploying v2 from ci"
        info = json.loads(os.pread(fd, 65536, 0).decode())
        assert info["name"] == "deploy"
        assert info["holder"] == key
        assert info["holder_note"] == "deploying v2 from ci"
        assert info["held_by_me"] is True and info["state"] == "held"
        assert info["waiters"] == 0
        lease_rev = etcd.etcdctl_json("get", key)["kvs"][0]["create_revision"]
        assert info["token"] == lease_rev
        assert 0 < info["ttl_ms"] <= 10000
        # another reader sees the same lock, not held by it
        other = json.loads(open(path).read())
        assert other["holder"] == key and other["held_by_me"] is False and other["state"] == "none"
        assert sorted(os.listdir(locks)) == ["deploy"]
        # a lock taken elsewhere is listed too
        p, q = etcdctl_lock(etcd, "/locks/elsewhere")
        try:
            assert q.get(timeout=10 * SLOW)
            assert sorted(os.listdir(locks)) == ["deploy", "elsewhere"]
        finally:
            end_process(p, signal.SIGTERM)
        # keys that are not locks are not listed
        etcd.put("/locks/plainkey", "x")
        assert sorted(os.listdir(locks)) == ["deploy"]
        etcd.etcdctl("del", "/locks/plainkey")
    finally:
        os.close(fd)
    wait_for(lambda: os.listdir(locks) == [], 5 * SLOW, 0.02, "an empty /locks after the close")
    # any name stats as a file; bad operations are refused
    assert os.stat(os.path.join(locks, "nothing")).st_size == 0
    with pytest.raises(OSError) as e:
        os.mkdir(os.path.join(locks, "dir"))
    assert e.value.errno in (errno.EPERM, errno.EACCES, errno.EEXIST)  # every name exists as a file
    with pytest.raises(OSError) as e:
        os.unlink(path)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.open(os.path.join(locks, "a", "b"), os.O_WRONLY)
    assert e.value.errno in (errno.ENOTDIR, errno.ENOENT, errno.EINVAL)
    # writing without holding is refused
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    assert keys(etcd) == []


def test_namespace_prefix(etcd, coordfs_mount):
    """--prefix puts the lock under <prefix>/locks/<name>/, where
    `etcdctl lock <prefix>/locks/<name>` meets it; other namespaces are apart."""
    m = coordfs_mount(etcd, "--prefix", "/ns1")
    other = coordfs_mount(etcd)
    fd = os.open(m.join("locks", "x"), os.O_WRONLY)
    try:
        (key,) = keys(etcd, "/")
        assert key.startswith("/ns1/locks/x/")
        assert os.listdir(m.join("locks")) == ["x"]
        assert os.listdir(other.join("locks")) == []
        assert json.loads(open(m.join("locks", "x")).read())["holder"] == key[len("/ns1"):]
        assert run(["flock", "-n", other.join("locks", "x"), "true"]).returncode == 0  # another lock
        p, q = etcdctl_lock(etcd, "/ns1/locks/x")
        try:
            wait_keys(etcd, 2, prefix="/ns1/locks/x/")
            with pytest.raises(queue.Empty):
                q.get(timeout=0.5)
        finally:
            end_process(p, signal.SIGTERM)
    finally:
        os.close(fd)
    wait_keys(etcd, 0, prefix="/")


def test_coordfs_stops_with_locks_in_use(etcd, coordfs_mount):
    """SIGTERM to coordfs with a lock held, an open and a flock waiting: it
    exits 0, the waiters fail, every key is deleted at once (not after the
    TTL), and (sanitized builds) nothing leaks."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "s")
    h = hold(path)
    expect_held(h)
    w1 = hold(path)
    w2 = popen(["flock", path, "true"], stderr=subprocess.DEVNULL)
    wait_keys(etcd, 3)
    m.kill(signal.SIGTERM)
    assert m.proc.wait(30 * SLOW) == 0
    wait_keys(etcd, 0, timeout=3)  # revoked, not expired (TTL 10 s)
    assert w2.wait(10 * SLOW) != 0
    for p in (h, w1):
        end_process(p, signal.SIGKILL)
    m.unmount()
    rep = harness.sanitizer_report(m.log())
    assert not rep, rep
