"""test_coordfs_events.py — /events/config, /events/services, /events/locks.

Open starts at the current revision; read blocks until the next event and
returns whole JSON lines; every change is delivered in order; poll wakes up;
a reader killed while blocked exits promptly.
"""

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


def E(m, which):
    return os.path.join(m.path, "events", which)


def read_lines(fd, n, timeout=10):
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n:
        r, _, _ = select.select([fd], [], [], max(0, deadline - time.monotonic()))
        if not r:
            raise AssertionError("only %r after %ss" % (buf, timeout))
        chunk = os.read(fd, 65536)
        assert chunk.endswith(b"\n"), chunk  # whole lines only
        buf += chunk
    return [json.loads(line) for line in buf.decode().splitlines()]


def test_config_events_every_change_in_order(etcd, fs):
    etcd.put("/config/before", "old")  # before open: not delivered
    fd = os.open(E(fs, "config"), os.O_RDONLY)
    try:
        for i in range(30):
            etcd.put("/config/k%d" % (i % 3), "v%d" % i) if i % 2 else \
                open(os.path.join(fs.path, "config", "k%d" % (i % 3)), "w").write("v%d" % i)
        etcd.etcdctl("del", "/config/k0")
        evs = read_lines(fd, 31)
    finally:
        os.close(fd)
    puts = [e for e in evs if e["type"] == "PUT"]
    assert [e["value"] for e in puts] == ["v%d" % i for i in range(30)]
    assert [e["key"] for e in puts] == ["k%d" % (i % 3) for i in range(30)]
    revs = [e["revision"] for e in evs]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    assert evs[-1] == {"type": "DELETE", "key": "k0", "revision": revs[-1]}


def test_read_blocks_until_next_event(etcd, fs):
    fd = os.open(E(fs, "config"), os.O_RDONLY)
    try:
        r, _, _ = select.select([fd], [], [], 0.3)
        assert r == []  # poll: nothing yet
        t0 = time.monotonic()
        p = subprocess.Popen(["bash", "-c", "sleep 0.5; etcdctl --endpoints %s put /config/late x" % etcd.endpoints],
                             stdout=subprocess.DEVNULL)
        data = os.read(fd, 4096)  # blocks
        assert time.monotonic() - t0 >= 0.4
        p.wait(10)
        ev = json.loads(data)
        assert ev["key"] == "late" and ev["value"] == "x" and ev["type"] == "PUT"
    finally:
        os.close(fd)


def test_poll_wakes_up(etcd, fs):
    fd = os.open(E(fs, "config"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 100)
        ep = select.epoll()
        ep.register(fd, select.EPOLLIN)
        assert ep.poll(0.2) == []
        etcd.put("/config/p", "1")
        got = ep.poll(5)
        assert got and got[0][1] & select.EPOLLIN
        assert json.loads(os.read(fd, 4096))["key"] == "p"
        assert ep.poll(0.2) == []
        ep.close()
    finally:
        os.close(fd)


def test_blocked_reader_killed_exits_promptly(etcd, fs):
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        child = subprocess.Popen(["cat", E(fs, "config")], stdout=subprocess.PIPE)
        time.sleep(0.3)
        assert child.poll() is None
        t0 = time.monotonic()
        child.send_signal(sig)
        child.wait(5)
        assert time.monotonic() - t0 < 1.0
    # the mount still works and the stream still delivers
    fd = os.open(E(fs, "config"), os.O_RDONLY)
    etcd.put("/config/after", "1")
    assert read_lines(fd, 1)[0]["key"] == "after"
    os.close(fd)


def test_many_small_reads_keep_lines_whole(etcd, fs):
    fd = os.open(E(fs, "config"), os.O_RDONLY)
    try:
        for i in range(5):
            etcd.put("/config/w", "x" * 100)
        time.sleep(0.3)
        out = b""
        while out.count(b"\n") < 5:
            chunk = os.read(fd, 300)  # room for two lines, not three
            assert chunk.endswith(b"\n")
            out += chunk
        assert all(json.loads(line)["value"] == "x" * 100 for line in out.splitlines())
    finally:
        os.close(fd)


def test_services_and_locks_streams(etcd, fs):
    fs_fd = os.open(E(fs, "services"), os.O_RDONLY)
    lk_fd = os.open(E(fs, "locks"), os.O_RDONLY)
    try:
        doc = '{"address":"1.2.3.4","port":5}'
        etcd.put("/services/chat/c1", doc)
        etcd.put("/locks/deploy/694d7a5a", "")
        etcd.put("/config/not-here", "x")
        ev = read_lines(fs_fd, 1)[0]
        assert ev["key"] == "chat/c1" and ev["type"] == "PUT" and json.loads(ev["value"])["port"] == 5
        ev = read_lines(lk_fd, 1)[0]
        assert ev["key"] == "deploy/694d7a5a"
        etcd.etcdctl("del", "/services/chat/c1")
        ev = read_lines(fs_fd, 1)[0]
        assert ev["type"] == "DELETE" and ev["key"] == "chat/c1"
    finally:
        os.close(fs_fd)
        os.close(lk_fd)


@pytest.mark.slow
def test_reader_that_does_not_keep_up_gets_a_lost_line(etcd, fs):
    fd = os.open(E(fs, "config"), os.O_RDONLY)
    try:
        big = "b" * (1024 * 1024)
        for i in range(18):  # ~18 MiB of lines, more than a stream keeps
            etcd.put("/config/big", big)
        etcd.put("/config/last", "x")
        buf = b""
        deadline = time.monotonic() + 30
        while not buf.endswith(b'"key":"last","revision":%d,"value":"x"}\n' % etcd.revision()):
            assert time.monotonic() < deadline, buf[:200]
            buf += os.read(fd, 1 << 20)  # a 1 MiB line comes in pieces
        lines = [json.loads(line) for line in buf.decode().splitlines()]
        # the first events may be read before the backlog overflows
        assert [e["type"] for e in lines].count("LOST") >= 1
        assert len(lines) < 18 + 1
        assert all(e["key"] == "big" for e in lines[:-1] if e["type"] != "LOST")
        assert lines[-1]["value"] == "x"
    finally:
        os.close(fd)


def opened(pid, path):
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == path:
                return True
        except OSError:
            pass
    return False


def test_shell_tools_read_the_stream(etcd, fs):
    """`head -n 2` and `grep -m 1` stop after their lines, quietly (head
    seeks back over what it read beyond them), and `read` takes one line."""
    path = E(fs, "config")
    tools = {"head": ["head", "-n", "2", path], "grep": ["grep", "-m", "1", '"key":"g1"', path],
             "read": ["bash", "-c", 'read -r l < "$1" && printf "%s\\n" "$l"', "-", path]}
    for name, argv in tools.items():
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: opened(p.pid, path), 10, what="%s opened the stream" % name)  # it starts at open
            etcd.put("/config/g0", name)
            etcd.put("/config/g1", name)
            out, err = p.communicate(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0 and err == "", (name, p.returncode, err)
        lines = [json.loads(line) for line in out.splitlines()]
        want = {"head": ["g0", "g1"], "grep": ["g1"], "read": ["g0"]}[name]
        assert [e["key"] for e in lines] == want, (name, out)
        assert all(e["value"] == name for e in lines), (name, out)
