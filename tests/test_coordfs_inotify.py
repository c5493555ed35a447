"""test_coordfs_inotify.py — inotify on the mount for changes made anywhere.

inotifywait sees MODIFY, CREATE and DELETE for changes made with etcdctl,
on a file watch and on a recursive directory watch; a waiter that blocks
until the file changes (what a systemd path unit does) wakes up; the
mount's own writes are reported once, not echoed again.
"""

import os
import select
import subprocess
import time

import pytest

from harness import wait_for


@pytest.fixture
def fs(etcd, coordfs_mount):
    return coordfs_mount(etcd)


def C(m, *parts):
    return os.path.join(m.path, "config", *parts)


class Inotifywait:
    """inotifywait -m in the background; its events are read unbuffered."""

    def __init__(self, *args):
        self.p = subprocess.Popen(["inotifywait", "-m", "--format", "%e %w%f"] + list(args),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = b""
        while b"established" not in err:
            chunk = os.read(self.p.stderr.fileno(), 4096)
            if not chunk:
                raise AssertionError("inotifywait failed: %r" % err)
            err += chunk
        self.lines = []
        self.buf = b""

    def wait(self, pred, timeout=5):
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while not any(pred(line) for line in self.lines):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching event; got %r" % self.lines)
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError("inotifywait ended; got %r" % self.lines)
                self.buf += chunk
                *done, self.buf = self.buf.split(b"\n")
                self.lines += [d.decode() for d in done]

    def pump(self, seconds):
        """Read every event that arrives within `seconds`."""
        try:
            self.wait(lambda l: False, timeout=seconds)
        except AssertionError:
            pass

    def close(self):
        self.p.kill()
        self.p.wait()


def test_file_watch_sees_modify(etcd, fs):
    etcd.put("/config/app", "1")
    wait_for(lambda: os.path.exists(C(fs, "app")), 5, what="app")
    w = Inotifywait(C(fs, "app"))
    try:
        etcd.put("/config/app", "2")
        w.wait(lambda l: l.startswith("MODIFY"))
        w.wait(lambda l: l.startswith("CLOSE_WRITE"))
        with open(C(fs, "app")) as f:
            assert f.read() == "2"
        etcd.etcdctl("del", "/config/app")
        w.wait(lambda l: "DELETE_SELF" in l or "ATTRIB" in l)
    finally:
        w.close()


def test_recursive_dir_watch_sees_modify_create_delete(etcd, fs):
    etcd.put("/config/svc/a", "1")
    wait_for(lambda: os.path.exists(C(fs, "svc", "a")), 5, what="svc/a")
    w = Inotifywait("-r", C(fs))
    try:
        etcd.put("/config/svc/a", "2")
        w.wait(lambda l: l == "MODIFY " + C(fs, "svc", "a"))
        etcd.put("/config/svc/b", "new")
        w.wait(lambda l: l == "CREATE " + C(fs, "svc", "b"))
        etcd.put("/config/top", "new")
        w.wait(lambda l: l == "CREATE " + C(fs, "top"))
        etcd.put("/config/newdir/x", "1")
        w.wait(lambda l: l == "CREATE,ISDIR " + C(fs, "newdir"))
        etcd.etcdctl("del", "/config/svc/b")
        w.wait(lambda l: l == "DELETE " + C(fs, "svc", "b"))
        etcd.etcdctl("del", "/config/top")
        w.wait(lambda l: l == "DELETE " + C(fs, "top"))
    finally:
        w.close()


class Marked:
    """Splits a watch's events into what each step caused.

    After each step an etcdctl put of a new marker key (zz-mark-N) makes the
    notifier create the marker's file.  The watch thread handles events in
    revision order and the notifier performs its jobs in order, so once
    CREATE of zz-mark-N is seen, any echo of the step (an event of an
    earlier revision) has been reported before it, and the writer's own
    events (raised by the kernel inside its system calls) even earlier: the
    count is exact, not a guess of how long to wait.  Each marker has its
    own name, so a late event of an earlier marker is never taken for it."""

    def __init__(self, etcd, fs, w):
        self.etcd, self.fs, self.w, self.n, self.pos = etcd, fs, w, 0, len(w.lines)
        self.step()  # whatever the watched key's creation still has to say

    def step(self):
        """Events since the last step, marker lines left out."""
        self.n += 1
        name = "/zz-mark-%d" % self.n
        self.etcd.put("/config" + name, "")
        is_mark = lambda l: l.startswith("CREATE") and l.endswith(name)
        self.w.wait(is_mark)
        end = next(i for i in range(self.pos, len(self.w.lines)) if is_mark(self.w.lines[i]))
        out = [l for l in self.w.lines[self.pos:end] if "/zz-mark-" not in l]
        self.pos = end + 1
        return out


def watch_key(etcd, fs, name):
    """A key that exists, and a Marked watch on the config directory."""
    etcd.put("/config/" + name, "0")
    wait_for(lambda: os.path.exists(C(fs, name)), 5, what=name)
    w = Inotifywait(C(fs))
    try:
        return w, Marked(etcd, fs, w)
    except BaseException:
        w.close()
        raise


def count(lines, event, name):
    return sum(1 for l in lines if l.split(" ", 1)[0].split(",")[0] == event and l.endswith("/" + name))


def test_own_writes_not_echoed(etcd, fs):
    """Every kind of write of this mount is reported once, by the kernel,
    for the process that made it: the notifier adds nothing.  Twenty
    rewrites in a row give the Put's watch event many chances to overtake
    the Put's answer (the race that used to echo about one write in two)."""
    w, m = watch_key(etcd, fs, "mine")
    try:
        for i in range(20):
            with open(C(fs, "mine"), "w") as f:
                f.write("v%d" % i)
            ev = m.step()
            assert count(ev, "CLOSE_WRITE", "mine") == 1, (i, ev)
            assert count(ev, "ATTRIB", "mine") == 0, (i, ev)  # the notifier's futimens
        assert etcd.get("/config/mine") == "v19"

        with open(C(fs, "mine"), "a") as f:  # append: a compare-and-put
            f.write("+")
        ev = m.step()
        assert count(ev, "CLOSE_WRITE", "mine") == 1 and count(ev, "ATTRIB", "mine") == 0, ev

        os.truncate(C(fs, "mine"), 2)  # truncate(2) on a path: committed at once
        ev = m.step()
        assert count(ev, "CLOSE_WRITE", "mine") == 0 and count(ev, "ATTRIB", "mine") == 0, ev
        assert count(ev, "MODIFY", "mine") == 1, ev
        assert etcd.get("/config/mine") == "v1"

        with open(C(fs, "fresh"), "w") as f:  # a new key
            f.write("x")
        ev = m.step()
        assert count(ev, "CREATE", "fresh") == 1 and count(ev, "CLOSE_WRITE", "fresh") == 1, ev

        os.rename(C(fs, "fresh"), C(fs, "moved"))  # one Txn: put + delete
        ev = m.step()
        assert count(ev, "MOVED_FROM", "fresh") == 1 and count(ev, "MOVED_TO", "moved") == 1, ev
        assert count(ev, "DELETE", "fresh") == 0 and count(ev, "CREATE", "moved") == 0, ev

        os.unlink(C(fs, "moved"))
        ev = m.step()
        assert count(ev, "DELETE", "moved") == 1, ev
        assert etcd.get("/config/moved") is None
    finally:
        w.close()


def test_change_from_elsewhere_after_own_writes_is_reported(etcd, fs):
    """The echo suppression must not swallow the next change made by
    someone else: after this mount's writes, an etcdctl put is reported."""
    w, m = watch_key(etcd, fs, "both")
    try:
        for i in range(5):
            with open(C(fs, "both"), "w") as f:
                f.write("mine%d" % i)
            m.step()
            etcd.put("/config/both", "theirs%d" % i)
            ev = m.step()
            assert count(ev, "MODIFY", "both") >= 1 and count(ev, "CLOSE_WRITE", "both") == 1, (i, ev)
            with open(C(fs, "both")) as f:
                assert f.read() == "theirs%d" % i
    finally:
        w.close()


def test_waiter_wakes_up_on_change(etcd, fs):
    """inotifywait -e close_write,modify FILE exits on the first change, as a
    systemd path unit (PathModified=) would fire."""
    etcd.put("/config/flag", "off")
    wait_for(lambda: os.path.exists(C(fs, "flag")), 5, what="flag")
    p = subprocess.Popen(["inotifywait", "-q", "-e", "close_write", "-e", "modify", C(fs, "flag")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert p.poll() is None
        etcd.put("/config/flag", "on")
        out, _ = p.communicate(timeout=5)
        assert p.returncode == 0 and ("MODIFY" in out or "CLOSE_WRITE" in out)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_second_mount_change_seen(etcd, coordfs_mount):
    a, b = coordfs_mount(etcd), coordfs_mount(etcd)
    with open(C(a, "shared"), "w") as f:
        f.write("1")
    wait_for(lambda: os.path.exists(C(b, "shared")), 5, what="shared on b")
    w = Inotifywait(C(b))
    try:
        with open(C(a, "shared"), "w") as f:
            f.write("2")
        w.wait(lambda l: l == "MODIFY " + C(b, "shared"))
        with open(C(a, "other"), "w") as f:
            f.write("x")
        w.wait(lambda l: l == "CREATE " + C(b, "other"))
    finally:
        w.close()


def test_service_instances_create_and_delete(etcd, fs):
    os.listdir(os.path.join(fs.path, "services"))
    w = Inotifywait("-r", os.path.join(fs.path, "services"))
    try:
        etcd.put("/services/chat/c1", '{"address":"1.1.1.1","port":1}')
        w.wait(lambda l: l == "CREATE,ISDIR " + os.path.join(fs.path, "services", "chat"))
        etcd.etcdctl("del", "/services/chat/c1")
        w.wait(lambda l: l.startswith("DELETE"))
    finally:
        w.close()
