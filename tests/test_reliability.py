"""test_reliability.py — coordfs and libcoord under etcd faults.

- Leader failover on a three-member cluster: a shell loop writing unique
  files into the mount (an acknowledged write is a successful close) and a
  libcoord writer (core_kv writer) both go on after kill -9 of the leader;
  zero acknowledged writes are lost; an inotifywait -m -r on the mount's
  config dir and an /events/config reader each saw every key that changed.
  The longest write pause of each writer is printed (and appended to
  $COORD_BUILD/reliability.txt).
- SIGSTOP of the member coordfs talks to: reads and writes through the
  mount go on, and a change made elsewhere still reaches the mount.
- coordfs killed with SIGKILL and started again on the same mount point
  (after fusermount3 -u -z): the mount comes back, its old lock and
  registration are freed after their TTL, the config in etcd is intact.
- Compaction while coordfs is cut off from etcd: an inotify watcher, an
  /events/config reader and the mount itself each end with the true state.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import harness
from harness import end_process, start_prog, wait_for

SLOW = 3.0 if harness.SANITIZE else 1.0


def report(line):
    """Print a measured figure and keep it in $COORD_BUILD/reliability.txt."""
    print(line)
    try:
        with open(os.path.join(harness.build_dir(), "reliability.txt"), "a") as f:
            f.write("%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), line))
    except OSError:
        pass


def retry(fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (harness.HarnessError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Lines:
    """Collects the lines a process writes on a pipe, each with the
    monotonic time it arrived."""

    def __init__(self, pipe):
        self.lines = []
        self.cond = threading.Condition()
        self.t = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self.t.start()

    def _pump(self, pipe):
        for line in pipe:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()

    def wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, l in self.lines:
                    if pred(l):
                        return t, l
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for %s; last lines: %s" % (
                        what, [l for _, l in self.lines[-10:]]))
                self.cond.wait(min(left, 0.2))

    def snapshot(self):
        with self.cond:
            return list(self.lines)


def popen(argv, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    return harness._popen(argv, stdout=subprocess.PIPE, text=True, errors="replace",
                          start_new_session=True, **kw)


def inotify_watch(path):
    """inotifywait -m -r on path; returns (proc, Lines) once its watches are
    established.  Lines are "EVENTS FULLPATH"."""
    p = popen(["inotifywait", "-m", "-r", "--format", "%e %w%f", "-e",
               "create,modify,close_write,delete,moved_to,moved_from,attrib", path], stderr=subprocess.PIPE)
    for line in p.stderr:
        if "Watches established" in line:
            break
    else:
        raise AssertionError("inotifywait did not start")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, Lines(p.stdout)


def events_reader(m):
    """cat of /events/config (a stream that starts at the current revision);
    returns (proc, Lines of JSON)."""
    p = popen(["cat", m.join("events", "config")])
    time.sleep(0.3 * SLOW)  # the open must have happened before the changes to see
    return p, Lines(p.stdout)


def event_keys(lines):
    out = []
    for _, l in lines.snapshot():
        try:
            out.append(json.loads(l))
        except ValueError:
            raise AssertionError("bad /events line: %r" % l)
    return out


def longest_gap(times, after=None):
    times = sorted(times)
    best = 0.0
    for a, b in zip(times, times[1:]):
        if after is None or b >= after:
            best = max(best, b - a)
    return best


# ------------------------------------------------------------------ failover

SHELL_WRITER = r'''
i=0
while [ ! -e "$2" ]; do
  f=$(printf 'w%06d' $i)
  if /bin/echo "$i" > "$1/$f" 2>/dev/null; then echo "ack $f"; else echo "err $f"; fi
  i=$((i+1))
done
echo done
'''


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_leader_failover_no_acknowledged_write_lost(etcd_cluster, coordfs_mount, tmp_path):
    cl = etcd_cluster
    cl.put("/config/fo/init", "0")
    cl.put("/config/lc/init", "0")
    m = coordfs_mount(cl)  # every member's endpoint
    cfg = m.join("config")
    wait_for(lambda: os.path.isdir(os.path.join(cfg, "lc")), 10, what="lc dir")
    ino, ino_lines = inotify_watch(cfg)
    ev, ev_lines = events_reader(m)
    stop = str(tmp_path / "stop")
    procs = [ino, ev]
    try:
        sh = popen(["bash", "-c", SHELL_WRITER, "writer", os.path.join(cfg, "fo"), stop])
        procs.append(sh)
        sh_lines = Lines(sh.stdout)
        lc = start_prog("tests/core_kv", "writer", "10000000", "/config/lc", endpoints=cl.all_endpoints)
        procs.append(lc)
        lc_lines = Lines(lc.stdout)
        sh_lines.wait(lambda l: l == "ack w000100", 60 * SLOW, "100 coordfs writes")
        lc_lines.wait(lambda l: l == "ack /config/lc/000100", 60 * SLOW, "100 libcoord writes")
        leader = cl.leader()
        t_kill = time.monotonic()
        leader.kill()
        time.sleep(1.0)
        # both resume: 100 more acknowledged writes each after the kill
        for lines, what in ((sh_lines, "coordfs"), (lc_lines, "libcoord")):
            n0 = sum(1 for t, l in lines.snapshot() if t <= t_kill and l.startswith("ack"))
            wait_for(lambda: sum(1 for t, l in lines.snapshot() if t > t_kill and l.startswith("ack")) >= 100,
                     60 * SLOW, 0.1, "100 %s writes after the kill (%d before)" % (what, n0))
        open(stop, "w").close()
        sh_lines.wait(lambda l: l == "done", 60 * SLOW, "the shell writer to stop")
        end_process(lc, signal.SIGTERM)
        # a last key through etcdctl marks the end for both watchers
        retry(lambda: cl.etcdctl("put", "/config/fo/zz-end", "x"))
        ino_lines.wait(lambda l: l.endswith("/fo/zz-end"), 30 * SLOW, "inotify: the end key")
        ev_lines.wait(lambda l: '"fo/zz-end"' in l, 30 * SLOW, "/events: the end key")
        stored = retry(lambda: cl.get_prefix("/config/"))
    finally:
        for p in procs:
            end_process(p, signal.SIGKILL)
    # zero acknowledged writes lost
    sh_acks = [(t, l.split()[1]) for t, l in sh_lines.snapshot() if l.startswith("ack ")]
    lc_acks = [(t, l.split()[1]) for t, l in lc_lines.snapshot() if l.startswith("ack ")]
    lost = [k for _, k in sh_acks if "/config/fo/" + k not in stored]
    lost += [k for _, k in lc_acks if k not in stored]
    assert not lost, "acknowledged writes lost: %s" % lost[:10]
    for _, k in sh_acks:  # and they hold what was written
        assert stored["/config/fo/" + k] == "%d\n" % int(k[1:])
    # every key that changed was seen by inotify and by /events/config
    changed = {k[len("/config/"):] for k in stored if k not in ("/config/fo/init", "/config/lc/init")}
    seen_ev = {e["key"] for e in event_keys(ev_lines) if e["type"] == "PUT"}
    seen_ino = set()
    for _, l in ino_lines.snapshot():
        evs, path = l.split(" ", 1)
        if path.startswith(cfg + "/") and ("CREATE" in evs or "MODIFY" in evs or "CLOSE_WRITE" in evs
                                           or "MOVED_TO" in evs):
            seen_ino.add(path[len(cfg) + 1:])
    assert not changed - seen_ev, "/events/config missed %d keys: %s" % (
        len(changed - seen_ev), sorted(changed - seen_ev)[:10])
    assert not changed - seen_ino, "inotify missed %d keys: %s" % (
        len(changed - seen_ino), sorted(changed - seen_ino)[:10])
    revs = [e["revision"] for e in event_keys(ev_lines)]
    assert revs == sorted(set(revs)), "/events/config repeated or reordered events"
    sh_pause = longest_gap([t for t, _ in sh_acks], after=t_kill - 5)
    lc_pause = longest_gap([t for t, _ in lc_acks], after=t_kill - 5)
    errs = sum(1 for _, l in sh_lines.snapshot() if l.startswith("err"))
    lc_errs = sum(1 for _, l in lc_lines.snapshot() if l.startswith("err"))
    report("failover: coordfs writer %d acked, %d failed, longest pause %.2f s; "
           "libcoord writer %d acked, %d failed, longest pause %.2f s; %d keys, none lost, "
           "inotify and /events saw all" % (len(sh_acks), errs, sh_pause, len(lc_acks), lc_errs, lc_pause,
                                            len(changed)))


# ------------------------------------------------------------------ SIGSTOP

@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_frozen_member_reads_and_writes_continue(etcd_cluster, coordfs_mount):
    cl = etcd_cluster
    cl.put("/config/s/init", "0")
    m = coordfs_mount(cl.all_endpoints)
    cfg = m.join("config", "s")
    wait_for(lambda: os.path.exists(os.path.join(cfg, "init")), 10, what="init")
    with open(m.join("status")) as f:
        a = cl.member(json.load(f)["endpoint"])  # the member coordfs talks to
    with open(os.path.join(cfg, "before"), "w") as f:
        f.write("b")
    others = ",".join(x.endpoint for x in cl.members[1:])
    a.pause()
    fails, worst, n = 0, 0.0, 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 25 * SLOW or n < 20:
            n += 1
            p = os.path.join(cfg, "k%03d" % n)
            t = time.monotonic()
            try:
                with open(p, "w") as f:
                    f.write(str(n))
                with open(p) as f:
                    assert f.read() == str(n)
            except OSError:
                fails += 1
            worst = max(worst, time.monotonic() - t)
            if n >= 200:
                break
        # a change made elsewhere reaches the mount (its watch moved)
        retry(lambda: cl.etcdctl("put", "/config/s/remote", "r", endpoints=others))
        wait_for(lambda: os.path.exists(os.path.join(cfg, "remote")), 30 * SLOW, what="remote key in the mount")
        assert open(os.path.join(cfg, "remote")).read() == "r"
        stored = retry(lambda: cl.get_prefix("/config/s/", endpoints=others))
    finally:
        a.resume()
    assert fails <= 2, "%d of %d write+read rounds failed with the member frozen" % (fails, n)
    ok = [k for k in range(1, n + 1) if stored.get("/config/s/k%03d" % k) == str(k)]
    assert len(ok) >= n - fails
    report("sigstop: %d write+read rounds through the mount with its member frozen, %d failed, "
           "longest round %.2f s" % (n, fails, worst))


# ------------------------------------------------------------------ kill -9 coordfs

HOLD = ("import os,sys,time\n"
        "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT)\n"
        "if len(sys.argv)>2: os.write(fd, sys.argv[2].encode())\n"
        "print('HELD', flush=True)\n"
        "time.sleep(600)\n")


@pytest.mark.timeout(180)
def test_coordfs_sigkill_and_restart_same_mountpoint(etcd, coordfs_mount):
    for i in range(20):
        etcd.put("/config/app/k%02d" % i, "v%d" % i)
    m = coordfs_mount(etcd, "--lock-ttl", "2s", "--service-ttl", "2s")
    with open(m.join("config", "app", "written"), "w") as f:
        f.write("through the mount")
    holder = popen([sys.executable, "-c", HOLD, m.join("locks", "deploy"), "deploying"])  # the write locks
    reg = popen([sys.executable, "-c", HOLD, m.join("services", "chat", "c1"),
                 '{"address":"10.0.0.5","port":8080}'])
    try:
        assert holder.stdout.readline().strip() == "HELD"
        assert reg.stdout.readline().strip() == "HELD"
        wait_for(lambda: etcd.get_prefix("/services/chat/"), 10, what="registration")
        assert len(etcd.get_prefix("/locks/deploy/")) == 1
        before = etcd.get_prefix("/config/")
        m.kill(signal.SIGKILL)
        m.proc.wait(10)
        t_kill = time.monotonic()
    finally:
        end_process(holder, signal.SIGKILL)
        end_process(reg, signal.SIGKILL)
    r = harness.fusermount_u(m.path, lazy=True)
    assert r.returncode == 0, r.stderr
    assert not harness.mounted(m.path)
    # the same mount point, a new coordfs
    m2 = coordfs_mount(etcd, "--lock-ttl", "2s", "--service-ttl", "2s", mountpoint=m.path)
    assert open(m2.join("config", "app", "k07")).read() == "v7"
    assert open(m2.join("config", "app", "written")).read() == "through the mount"
    # the old lease ends after its TTL: lock and registration freed
    wait_for(lambda: not etcd.get_prefix("/locks/") and not etcd.get_prefix("/services/"), 15 * SLOW, 0.1,
             "the dead mount's lock and registration to expire")
    freed = time.monotonic() - t_kill
    assert etcd.get_prefix("/config/") == before  # nothing damaged
    # and the lock can be taken again through the new mount, at once
    fd = os.open(m2.join("locks", "deploy"), os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"again")  # EAGAIN if still held
        assert len(etcd.get_prefix("/locks/deploy/")) == 1
    finally:
        os.close(fd)
    wait_for(lambda: not etcd.get_prefix("/locks/"), 10, what="lock released")
    m.proc = None  # the old mount point now belongs to m2
    report("kill -9 coordfs: remounted, old lock and registration freed %.1f s after the kill (TTL 2 s)" % freed)


# ------------------------------------------------------------------ compaction

@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_compaction_while_disconnected_inotify_events_mount_end_true(etcd_cluster, coordfs_mount):
    cl = etcd_cluster
    a = cl.members[0]
    for i in range(10):
        cl.put("/config/c/k%d" % i, "old%d" % i)
    m = coordfs_mount(a.endpoint)  # only this member: its death cuts the mount off
    cfg = m.join("config")
    wait_for(lambda: len(os.listdir(os.path.join(cfg, "c"))) == 10, 10, what="10 keys")
    ino, ino_lines = inotify_watch(cfg)
    ev, ev_lines = events_reader(m)
    try:
        cl.put("/config/c/live", "1")
        ev_lines.wait(lambda l: '"c/live"' in l, 20 * SLOW, "/events: live")
        ino_lines.wait(lambda l: l.endswith("/c/live"), 20 * SLOW, "inotify: live")
        a.kill()
        others = ",".join(x.endpoint for x in cl.members[1:])
        for i in range(4):
            retry(lambda: cl.etcdctl("del", "/config/c/k%d" % i, endpoints=others))
        for i in range(4, 8):
            retry(lambda: cl.etcdctl("put", "/config/c/k%d" % i, "new%d" % i, endpoints=others))
        retry(lambda: cl.etcdctl("put", "/config/c/fresh", "f", endpoints=others))
        retry(lambda: cl.etcdctl("put", "/config/c/live", "2", endpoints=others))
        retry(lambda: cl.etcdctl("del", "/config/c/live", endpoints=others))
        r = retry(lambda: int(cl.etcdctl_json("get", "/", "--limit", "1", endpoints=others)["header"]["revision"]))
        retry(lambda: cl.etcdctl("compact", str(r), "--physical", endpoints=others))
        cl.restart(a)
        truth = retry(lambda: cl.get_prefix("/config/c/"))
        want = {k[len("/config/"):]: v for k, v in truth.items()}

        def mount_state():
            try:
                names = os.listdir(os.path.join(cfg, "c"))
                return {"c/" + n: open(os.path.join(cfg, "c", n)).read() for n in names}
            except OSError:
                return None
        wait_for(lambda: mount_state() == want, 60 * SLOW, 0.2, "the mount to show the true state")
        # the events stream: initial state + events == the truth
        state = {"c/k%d" % i: "old%d" % i for i in range(10)}

        def replay():
            s = dict(state)
            for e in event_keys(ev_lines):
                if e["type"] == "PUT":
                    s[e["key"]] = e.get("value")
                else:
                    s.pop(e["key"], None)
            return s
        wait_for(lambda: replay() == want, 30 * SLOW, 0.2, "/events/config replay to reach the truth")

        # inotify: names created and deleted give the true set of names,
        # and each changed key had a modify/close_write after the cut
        def ino_names():
            names = {"c/k%d" % i for i in range(10)}
            for _, l in ino_lines.snapshot():
                evs, path = l.split(" ", 1)
                rel = path[len(cfg) + 1:]
                if "CREATE" in evs or "MOVED_TO" in evs:
                    names.add(rel)
                elif "DELETE" in evs or "MOVED_FROM" in evs:
                    names.discard(rel)
            return names
        wait_for(lambda: ino_names() == set(want), 30 * SLOW, 0.2, "inotify names to reach the truth")
    finally:
        for p in (ino, ev):
            end_process(p, signal.SIGKILL)
    assert want == {"c/k%d" % i: "new%d" % i for i in range(4, 8)} | {"c/k8": "old8", "c/k9": "old9",
                                                                         "c/fresh": "f"}
