"""test_coordfs_locks.py — coordfs /locks against a real etcd and a real mount.

Locks are taken the way scripts take them: flock(1) on /mnt/locks/<name>
(the flock(2) op), and the write idiom: `exec 9>/mnt/locks/<name>` opens
without blocking and without taking anything, then `flock -n 9` tries, or
`echo note >&9` waits for the lock (writing acquires; held while open);
os.open + os.write from Python likewise.  Checked: opening never blocks,
whatever the flags; mutual exclusion with a non-atomic read-increment-write
(flock, the write idiom, write + flock -u; one mount and two mounts),
interop with `etcdctl lock` both ways, FIFO order, flock -n / -w (also with
etcd paused past coordfs's --timeout: the wait goes on), O_NONBLOCK writes
(EAGAIN), interrupted and killed waiters leaving no key (also answered at
once while etcd is paused), a killed holder, 200 waiters that do not block
the file system, a revoked lease (lost lock: logged, EIO on
write/read/poll/close), kill -9 of coordfs (lock freed after --lock-ttl),
--lock-ttl renewal, the JSON read, notes, listing and refused names.
"""

import base64
import ctypes
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


def pump_lines(p):
    """p.lines: a queue of p's stdout lines (None at the end)."""
    q = queue.Queue()

    def pump():
        for line in p.stdout:
            q.put(line.strip())
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    p.lines = q
    return p


def hold(path, note="held"):
    """A Python process that opens path for writing (which returns at once),
    prints OPENED, writes the note (writing takes the lock: it blocks until
    granted), prints HELD, then sleeps until killed."""
    code = ("import os,sys,time\n"
            "fd=os.open(sys.argv[1], os.O_WRONLY)\n"
            "print('OPENED', flush=True)\n"
            "os.write(fd, sys.argv[2].encode())\n"
            "print('HELD', flush=True)\n"
            "time.sleep(600)\n")
    p = popen([sys.executable, "-c", code, path, note], stdout=subprocess.PIPE, text=True)
    pump_lines(p)
    assert p.lines.get(timeout=10 * SLOW) == "OPENED"  # opening never waits
    return p


def expect_held(p, timeout=20.0):
    assert p.lines.get(timeout=timeout * SLOW) == "HELD"


def not_held_yet(p, wait=0.5):
    with pytest.raises(queue.Empty):
        p.lines.get(timeout=wait)


def take(path, flags=os.O_WRONLY, note=b"mine"):
    """Opens path and writes note (writing takes the lock; with O_NONBLOCK
    EAGAIN if held); returns the descriptor, which holds the lock."""
    fd = os.open(path, flags)
    try:
        assert os.write(fd, note) == len(note)
    except BaseException:
        os.close(fd)
        raise
    return fd


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

# the write idiom: open, write (waits for the lock, becomes the note), close
COUNTER_EXEC = r'''
for i in $(seq "$N"); do
  exec 9>"$L" || exit 1
  echo "counter $$ $i" >&9 || exit 1
  n=$(cat "$C"); sleep 0.001; echo $((n+1)) > "$C"
  exec 9>&-
done
'''

# one open for the whole loop: each write takes the lock again, flock -u lets go
COUNTER_WRITE_UNLOCK = r'''
exec 9>"$L" || exit 1
for i in $(seq "$N"); do
  echo "counter $$ $i" >&9 || exit 1
  n=$(cat "$C"); sleep 0.001; echo $((n+1)) > "$C"
  flock -u 9 || exit 1
done
exec 9>&-
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
def test_write_then_flock_u_counter_10x20(etcd, coordfs_mount, tmp_path):
    """Each process keeps one descriptor open; every write on it takes the
    lock again after flock -u let it go (a write by a holder only updates
    the note)."""
    m = coordfs_mount(etcd)
    n = run_counters(COUNTER_WRITE_UNLOCK, [m.join("locks", "x")], str(tmp_path / "count"), 10, 20)
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
    fd = take(m.join("locks", "x"))
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


# ------------------------------------------------------------------ opening, writing: the shell idioms


def bash(script, path, **kw):
    """bash -c script with L=path, stdout lines in .lines, in its own
    session (so that a test can signal it alone)."""
    env = dict(os.environ, L=path)
    env.update(kw.pop("env", {}))
    p = popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True, **kw)
    return pump_lines(p)


def test_exec_opens_at_once_and_flock_n_fails_while_held(etcd, coordfs_mount):
    """`exec 9>lock; flock -n 9 || exit 1`: the open returns at once while
    another holds the lock (it used to wait for it, then "get" it), flock -n
    fails at once; when free the same lines take the lock.  No open flag
    makes open wait or take anything."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "deploy")
    h = hold(path)
    expect_held(h)
    held = keys(etcd)
    script = 'exec 9>"$L" || exit 2; echo OPENED; flock -n 9 || exit 1; echo LOCKED; exec 9>&-'
    t = time.monotonic()
    r = run(["bash", "-c", script], env=dict(os.environ, L=path), timeout=10)
    took = time.monotonic() - t
    assert (r.returncode, r.stdout.split()) == (1, ["OPENED"]), r
    assert took < 1.0 * SLOW, took
    assert keys(etcd) == held
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_CREAT, os.O_WRONLY | os.O_TRUNC,
                  os.O_WRONLY | os.O_NONBLOCK, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK):
        t = time.monotonic()
        fd = os.open(path, flags, 0o644)
        os.close(fd)
        assert time.monotonic() - t < 0.5 * SLOW, flags
    assert keys(etcd) == held
    end_process(h, signal.SIGKILL)
    wait_keys(etcd, 0)
    r = run(["bash", "-c", script], env=dict(os.environ, L=path), timeout=10)
    assert (r.returncode, r.stdout.split()) == (0, ["OPENED", "LOCKED"]), r
    wait_keys(etcd, 0)


def test_echo_to_the_descriptor_waits_for_the_lock_and_is_the_note(etcd, coordfs_mount):
    """`exec 9>lock; echo "deploy by $USER" >&9`: the open returns at once,
    the write waits (queued in etcd) until the holder leaves, then holds the
    lock with its bytes as the note; the lock stays held while 9 is open."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "deploy")
    h = hold(path, "first")
    expect_held(h)
    script = ('exec 9>"$L" || exit 2; echo OPENED; echo "deploy by $USER" >&9 || exit 1; echo HELD; '
              'read x; exec 9>&-; echo DONE')
    p = bash(script, path, stdin=subprocess.PIPE, env={"USER": "tester"})
    assert p.lines.get(timeout=2 * SLOW) == "OPENED"
    wait_keys(etcd, 2)  # the write queued
    with pytest.raises(queue.Empty):
        p.lines.get(timeout=0.5)  # still waiting
    info = json.loads(open(path).read())
    assert info["holder_note"] == "first" and info["waiters"] == 1
    end_process(h, signal.SIGKILL)
    assert p.lines.get(timeout=5 * SLOW) == "HELD"
    (key,) = keys(etcd)
    info = json.loads(open(path).read())
    assert info["holder"] == key and info["holder_note"] == "deploy by tester\n"
    assert run(["flock", "-n", path, "true"]).returncode == 1
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.lines.get(timeout=5 * SLOW) == "DONE"
    assert p.wait(5 * SLOW) == 0
    wait_keys(etcd, 0)


def test_waiting_writer_does_not_stall_other_opens(etcd, coordfs_mount):
    """The kernel holds an inode's lock through a write, so a write waiting
    for the lock would stall every other write and O_TRUNC open of the same
    file on the mount, unkillably (coordfs gives each lookup its own inode).
    While one writer waits: another `exec 9>` opens at once, its flock -n
    fails at once, the holder can still update its note, and a second
    waiting writer can be interrupted."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "w")
    h = bash('exec 9>"$L"; echo first >&9; echo HELD; read x; echo "second note" >&9; echo NOTED; read x; exit 0',
             path, stdin=subprocess.PIPE)
    assert h.lines.get(timeout=5 * SLOW) == "HELD"
    w1 = bash('exec 9>"$L"; echo OPENED; echo w1 >&9; echo HELD; sleep 60', path)
    assert w1.lines.get(timeout=2 * SLOW) == "OPENED"
    wait_keys(etcd, 2)
    t = time.monotonic()
    r = run(["bash", "-c", 'exec 9>"$L" || exit 2; echo OPENED; flock -n 9 || exit 1; echo LOCKED'],
            env=dict(os.environ, L=path), timeout=10)
    assert (r.returncode, r.stdout.split()) == (1, ["OPENED"]), r
    assert time.monotonic() - t < 1.0 * SLOW
    w2 = bash('exec 9>"$L"; echo OPENED; echo w2 >&9; echo HELD; sleep 60', path)
    assert w2.lines.get(timeout=2 * SLOW) == "OPENED"
    wait_keys(etcd, 3)
    t = time.monotonic()
    os.killpg(w2.pid, signal.SIGKILL)  # a waiting writer dies at once
    w2.wait(5 * SLOW)
    assert time.monotonic() - t < 2.0 * SLOW
    wait_keys(etcd, 2, timeout=2)
    h.stdin.write("\n")  # the holder writes again: only its note changes
    h.stdin.flush()
    assert h.lines.get(timeout=5 * SLOW) == "NOTED"
    assert json.loads(open(path).read())["holder_note"] == "first\nsecond note\n"
    h.stdin.close()
    assert h.wait(5 * SLOW) == 0
    assert w1.lines.get(timeout=5 * SLOW) == "HELD"
    os.killpg(w1.pid, signal.SIGKILL)
    w1.wait(5 * SLOW)
    wait_keys(etcd, 0)


def test_nonblocking_write_fails_with_eagain_while_held(etcd, coordfs_mount):
    """A write with O_NONBLOCK (at open, or set later with fcntl F_SETFL)
    fails at once with EAGAIN while another holds the lock, leaving no key;
    when free it takes the lock and is the note."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "nb")
    h = hold(path)
    expect_held(h)
    held = keys(etcd)
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EAGAIN
        assert time.monotonic() - t < 1.0 * SLOW
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EAGAIN
        assert keys(etcd) == held
        assert json.loads(os.pread(fd, 65536, 0))["state"] == "none"
        end_process(h, signal.SIGKILL)
        wait_keys(etcd, 0)
        assert os.write(fd, b"now mine") == 8
        (key,) = keys(etcd)
        info = json.loads(os.pread(fd, 65536, 0))
        assert info["held_by_me"] and info["holder"] == key and info["holder_note"] == "now mine"
    finally:
        os.close(fd)
    wait_keys(etcd, 0)


def test_flock_w_on_the_open_descriptor_times_out_while_held(etcd, coordfs_mount):
    """`exec 9>lock; flock -w 2 9`: gives up after about 2 s while another
    holds the lock, leaving no key behind."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "w2")
    h = hold(path)
    expect_held(h)
    held = keys(etcd)
    t = time.monotonic()
    r = run(["bash", "-c", 'exec 9>"$L" || exit 2; echo OPENED; flock -w 2 9 || exit 1; echo LOCKED'],
            env=dict(os.environ, L=path), timeout=20)
    took = time.monotonic() - t
    assert (r.returncode, r.stdout.split()) == (1, ["OPENED"]), r
    assert 1.9 <= took < 2.0 + 1.5 * SLOW, took
    wait_keys(etcd, 1, timeout=2)
    assert keys(etcd) == held
    end_process(h, signal.SIGKILL)
    wait_keys(etcd, 0)


def test_interrupted_writer_gets_eintr_and_leaves_no_key(etcd, coordfs_mount):
    """A write that waits for the lock is interrupted by a signal: EINTR
    (here a SIGALRM handler that raises), at once, and its key goes; killed
    waiting writers (timeout -s KILL, SIGTERM) leave no key either."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "intr")
    h = hold(path)
    expect_held(h)
    held = keys(etcd)
    code = ("import errno,os,signal,sys,time\n"
            "class Alarm(Exception): pass\n"
            "def on_alarm(s, f): raise Alarm()\n"
            "signal.signal(signal.SIGALRM, on_alarm)\n"
            "fd=os.open(sys.argv[1], os.O_WRONLY)\n"
            "t=time.monotonic()\n"
            "signal.alarm(1)\n"
            "try:\n"
            "    os.write(fd, b'never')\n"
            "    print('WROTE')\n"
            "except Alarm:\n"
            "    print('INTERRUPTED %.3f' % (time.monotonic()-t))\n")
    r = run([sys.executable, "-c", code, path], timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("INTERRUPTED"), r
    assert float(r.stdout.split()[1]) < 1.0 + 0.5 * SLOW, r.stdout
    wait_keys(etcd, 1, timeout=2)
    assert keys(etcd) == held
    t = time.monotonic()
    r = run(["timeout", "-s", "KILL", "1", "bash", "-c", 'exec 9>"$L"; echo OPENED; echo w >&9; echo WROTE'],
            env=dict(os.environ, L=path), timeout=20)
    assert r.returncode in (-9, 124, 137) and r.stdout.split() == ["OPENED"], r
    assert time.monotonic() - t < 1.0 + 1.0 * SLOW
    wait_keys(etcd, 1, timeout=2)
    assert keys(etcd) == held
    w = bash('exec 9>"$L"; echo OPENED; echo w >&9; echo WROTE', path)
    assert w.lines.get(timeout=2 * SLOW) == "OPENED"
    wait_keys(etcd, 2)
    os.killpg(w.pid, signal.SIGTERM)
    w.wait(5 * SLOW)
    wait_keys(etcd, 1, timeout=2)
    assert keys(etcd) == held
    end_process(h, signal.SIGKILL)
    wait_keys(etcd, 0)
    assert run(["flock", "-n", path, "true"]).returncode == 0


def test_requests_of_one_open_file(etcd, coordfs_mount):
    """While a flock of an open file waits for the lock, a write on it fails
    with EDEADLK (EAGAIN with O_NONBLOCK) and flock -n with EWOULDBLOCK;
    flock -u withdraws the waiting flock (ENOLCK, no key left), and a
    waiting write the same way (EINTR).  A note too large for etcd fails
    with EFBIG before anything is queued.  (libc's calls through ctypes:
    Python would retry EINTR by itself.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    m = coordfs_mount(etcd)
    path = m.join("locks", "one")
    h = hold(path)
    expect_held(h)
    held = keys(etcd)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 2 << 20)
        assert e.value.errno == errno.EFBIG
        assert keys(etcd) == held
        for flocking, call in ((True, lambda: libc.flock(fd, fcntl.LOCK_EX)),
                               (False, lambda: libc.write(fd, b"note", 4))):
            res = []
            t = threading.Thread(target=lambda: res.append((call(), ctypes.get_errno())))
            t.start()
            wait_keys(etcd, 2)
            with pytest.raises(OSError) as e:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert e.value.errno == errno.EWOULDBLOCK
            if flocking:  # (a waiting write holds the inode's lock: a second write would wait for it)
                with pytest.raises(OSError) as e:
                    os.write(fd, b"x")
                assert e.value.errno == errno.EDEADLK
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
                with pytest.raises(OSError) as e:
                    os.write(fd, b"x")
                assert e.value.errno == errno.EAGAIN
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            fcntl.flock(fd, fcntl.LOCK_UN)
            t.join(5 * SLOW)
            assert res == [(-1, errno.ENOLCK if flocking else errno.EINTR)]
            wait_keys(etcd, 1, timeout=2)
            assert keys(etcd) == held
    finally:
        os.close(fd)
    end_process(h, signal.SIGKILL)
    wait_keys(etcd, 0)


# ------------------------------------------------------------------ etcd slow or paused


@pytest.mark.timeout(120)
def test_flock_w_keeps_waiting_across_an_etcd_pause(etcd, coordfs_mount):
    """etcd frozen (SIGSTOP) for longer than coordfs's --timeout while a
    holder holds: `flock -w 20` started meanwhile sees its etcd calls time
    out, but keeps waiting (it used to fail at the first timeout); after
    etcd resumes and the holder leaves, it gets the lock.  The same for a
    write waiting for the lock; and a `flock -w 2` that runs out meanwhile
    (between its retries) gives up on time.  (A queueing Txn that timed out
    may still be applied when etcd resumes: that dead entry delays the
    queue until its lease, no longer renewed, expires: up to --lock-ttl,
    10 s here.)"""
    m = coordfs_mount(etcd, "--timeout=1s")
    path = m.join("locks", "slow")
    h = hold(path)
    expect_held(h)
    etcd.pause(0)
    try:
        t = time.monotonic()
        w = popen(["flock", "-w", "20", path, "-c", "echo GOT"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
        ww = bash('exec 9>"$L"; echo OPENED; echo writer >&9 || exit 1; echo HELD; cat "$L"', path)
        assert ww.lines.get(timeout=2 * SLOW) == "OPENED"
        short = popen(["flock", "-w", "2", path, "true"])
        assert short.wait(5 * SLOW) == 1
        assert 1.9 < time.monotonic() - t < 2.0 + 1.0 * SLOW
        time.sleep(max(0.0, 3.5 - (time.monotonic() - t)))  # > 3 call timeouts
        assert w.poll() is None, w.communicate()
        assert ww.poll() is None
    finally:
        etcd.resume(0)
    paused = time.monotonic() - t
    time.sleep(1.0)
    assert w.poll() is None, w.communicate()
    assert ww.poll() is None
    end_process(h, signal.SIGKILL)
    out, err = w.communicate(timeout=25 * SLOW)
    assert w.returncode == 0 and out.strip() == "GOT", (w.returncode, out, err)
    assert ww.lines.get(timeout=20 * SLOW) == "HELD"  # before or after w: their retries queued them
    assert json.loads(ww.lines.get(timeout=5 * SLOW))["holder_note"] == "writer\n"
    assert ww.wait(5 * SLOW) == 0
    wait_keys(etcd, 0, timeout=15)
    assert "still waiting" in m.log()
    assert paused > 3.5


@pytest.mark.timeout(120)
def test_interrupt_answered_at_once_while_etcd_is_paused(etcd, coordfs_mount):
    """A waiter whose flock -w runs out while etcd is frozen gets its EINTR
    at once (it used to wait for the Delete of its queue key, i.e. for
    etcd); the Delete finishes after etcd resumes, and a try on the same
    mount right after the holder leaves is not fooled by that dead entry."""
    m = coordfs_mount(etcd, "--timeout=3s")
    path = m.join("locks", "frozen")
    h = hold(path)
    expect_held(h)
    w = popen(["flock", "-w", "1", path, "true"])
    t0 = time.monotonic()
    wait_keys(etcd, 2)
    etcd.pause(0)
    try:
        rc = w.wait(10 * SLOW)
        took = time.monotonic() - t0
        assert rc == 1
        assert took < 1.6 * (1.5 if harness.SANITIZE else 1), took  # not after the resume (2.5 s)
        # the holder leaves while etcd is still frozen; a try waits for this
        # mount's own release and withdrawal instead of seeing their keys
        os.kill(h.pid, signal.SIGKILL)
        h.wait(5)
        tr = popen(["flock", "-n", path, "true"])
        time.sleep(max(0.0, 2.5 - (time.monotonic() - t0)))
    finally:
        etcd.resume(0)
    assert tr.wait(10 * SLOW) == 0
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
    # O_NONBLOCK write: EAGAIN at once
    with pytest.raises(OSError) as e:
        take(path, os.O_WRONLY | os.O_NONBLOCK)
    assert e.value.errno == errno.EAGAIN
    assert keys(etcd) == held
    end_process(h, signal.SIGKILL)
    wait_keys(etcd, 0)
    # free: -n and O_NONBLOCK succeed, the second right after the first's exit
    assert run(["flock", "-n", path, "true"]).returncode == 0
    fd = take(path, os.O_WRONLY | os.O_NONBLOCK)
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
        os.close(take(path))
        os.close(take(path, os.O_WRONLY | os.O_NONBLOCK))  # EAGAIN would raise
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
    fd = take(path)
    fd2 = os.dup(fd)
    os.close(fd)
    with pytest.raises(OSError) as e:
        take(path, os.O_WRONLY | os.O_NONBLOCK)
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


def test_interrupted_write_leaves_no_key(etcd, coordfs_mount):
    """A write waiting for the lock, interrupted by SIGTERM / SIGINT (the
    process dies), withdraws its place: its key goes at once."""
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
    w2 = hold(path)  # a pending write
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
    """200 requests wait for one lock, half flock(1), half the write idiom:
    nothing else waits for them, and each gets the lock once."""
    m = coordfs_mount(etcd)
    path = m.join("locks", "big")
    granted = str(tmp_path / "granted")
    h = hold(path)
    expect_held(h)
    n = 200
    ws = []
    for i in range(n):
        if i % 2:
            ws.append(popen(["bash", "-c", 'exec 9>"$1"; echo "waiter %d" >&9 && echo %d >> "$2"' % (i, i),
                             "-", path, granted]))
        else:
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


def test_lost_lock_is_logged_and_its_descriptor_fails(etcd, coordfs_mount):
    """The holder's lease is revoked (as when coordfs is cut off past the
    TTL): coordfs logs the loss once, with name, key and token; read, write,
    poll and close of the holder's descriptor fail with EIO; another mount
    takes the lock."""
    a = coordfs_mount(etcd)
    b = coordfs_mount(etcd)
    path = a.join("locks", "lost")
    fd = take(path, os.O_RDWR, b"holder")
    try:
        (key,) = keys(etcd)
        token = etcd.etcdctl_json("get", key)["kvs"][0]["create_revision"]
        assert run(["flock", "-n", b.join("locks", "lost"), "true"]).returncode == 1
        etcd.etcdctl("lease", "revoke", key.rsplit("/", 1)[1])
        what = "lost: lease expired or revoked"
        wait_for(lambda: what in a.log(), 10 * SLOW, 0.05, "the loss in coordfs's log")
        lines = [ln for ln in a.log().splitlines() if what in ln]
        assert len(lines) == 1, lines
        assert "lock lost (key %s, token %d) lost: " % (key, token) in lines[0], lines[0]
        assert "read/write/poll now fail with EIO" in lines[0]
        for op in (lambda: os.write(fd, b"more"), lambda: os.pread(fd, 100, 0)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EIO
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLOUT)
        evs = p.poll(1000)
        assert evs and evs[0][1] & select.POLLERR
        assert run(["flock", "-n", b.join("locks", "lost"), "-c", "echo GOT"]).stdout.strip() == "GOT"
    finally:
        with pytest.raises(OSError) as e:
            os.close(fd)
        assert e.value.errno == errno.EIO
    assert len([ln for ln in a.log().splitlines() if what in ln]) == 1  # once per loss
    wait_keys(etcd, 0)


def test_read_after_loss_fails(etcd, coordfs_mount):
    """The first operation after the loss is a read: EIO, then write too."""
    m = coordfs_mount(etcd)
    fd = take(m.join("locks", "rd"), os.O_RDWR)
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
    fd = take(path, os.O_RDWR)
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
    fd = take(path)
    try:
        key = keys(etcd)[0]
        time.sleep(5)  # > 2 TTLs
        assert keys(etcd) == [key]
        os.pwrite(fd, b"still mine", 0)  # over the note "mine" of take()
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
    # a read-only descriptor neither writes nor takes the lock by writing
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
    fd = take(m.join("locks", "x"))
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
    """SIGTERM to coordfs with a lock held, a write and a flock waiting: it
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
