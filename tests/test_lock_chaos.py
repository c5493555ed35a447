"""test_lock_chaos.py — lock safety under chaos.

Workers of four kinds take the same lock (/locks/chaos) in a loop, on a
three-member etcd cluster:

  flock     bash loop of flock(1) on <mount A>/locks/chaos
  open      python loop that opens <mount B>/locks/chaos and writes a note
            (the write takes the lock; the lock is held until the close)
  libcoord  tests/c/chaos_locker (coord_lock_acquire)
  etcdctl   bash loop of `etcdctl lock /locks/chaos -- bash -c ...`

Each critical section appends one line to a shared log with a single
O_APPEND write, before the lock is released:

  KIND PID TOKEN START_NS END_NS ok|lost

(CLOCK_REALTIME ns; the token is the holder key's create revision, read
from the lock file's JSON, from coord_lock_token or with etcdctl get; a
section is "lost" when the holder can tell at its end that it no longer
held the lock: state, EIO or another holder's token.)  Meanwhile a chaos
loop SIGKILLs random workers (holders and waiters alike: each worker is a
process group, killed whole and started again) and kill -9 + restarts a
random etcd member.  Afterwards: no two "ok" sections overlap, tokens
increase in the order the sections ran, and no key is left under
/locks/chaos/.  A section whose holder was killed inside it leaves no line.

Short form in `make test` (COORD_CHAOS_SECONDS, default 40 s); `make soak`
runs it for 300 s.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import harness
from harness import wait_for

SECONDS = float(os.environ.get("COORD_CHAOS_SECONDS", "40"))
TTL_S = 3

FLOCK_WORKER = r'''
LOCK=$1 LOG=$2
while :; do
  flock "$LOCK" bash -c '
    s=$(date +%s%N)
    t=$(grep -o "\"token\": *[0-9]*" "$1" | grep -o "[0-9]*$")
    sleep 0.0$((RANDOM % 5))
    e=$(date +%s%N)
    t2=$(grep -o "\"token\": *[0-9]*" "$1" | grep -o "[0-9]*$")
    st=ok; { [ -n "$t" ] && [ "$t" = "$t2" ]; } || st=lost
    echo "flock $$ ${t:-0} $s $e $st" >> "$2"' _ "$LOCK" "$LOG" || sleep 0.1
done
'''

OPEN_WORKER = r'''
import errno, json, os, random, sys, time
lock, log = sys.argv[1], sys.argv[2]
lf = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def info(fd):
    return json.loads(os.pread(fd, 65536, 0).decode())
while True:
    try:
        fd = os.open(lock, os.O_RDWR)  # opening takes nothing; read gives the JSON
    except OSError:
        time.sleep(0.1)
        continue
    try:
        os.write(fd, b"open worker %d" % os.getpid())  # writing waits for the lock and takes it
    except OSError:
        os.close(fd)
        time.sleep(0.1)
        continue
    s = time.time_ns()
    try:
        i = info(fd)
        tok, mine = i["token"], i.get("held_by_me", True)
    except (OSError, ValueError, KeyError):
        tok, mine = 0, False
    time.sleep(random.random() * 0.04)
    e = time.time_ns()
    try:
        i = info(fd)
        lost = not mine or i["token"] != tok
    except (OSError, ValueError, KeyError):
        lost = True
    os.write(lf, ("open %d %d %d %d %s\n" % (os.getpid(), tok, s, e, "lost" if lost else "ok")).encode())
    try:
        os.close(fd)
    except OSError:
        pass
'''

ETCDCTL_WORKER = r'''
EPS=$1 LOG=$2 TTL=$3
export EPS LOG
rev() { etcdctl --endpoints="$EPS" --dial-timeout=1s --command-timeout=3s get "$ETCD_LOCK_KEY" -w json 2>/dev/null | grep -o '"create_revision":[0-9]*' | grep -o '[0-9]*$'; }
export -f rev
while :; do
  ETCDCTL_API=3 etcdctl --endpoints="$EPS" --dial-timeout=1s lock --ttl="$TTL" /locks/chaos -- bash -c '
    s=$(date +%s%N)
    t=$(rev)
    sleep 0.0$((RANDOM % 5))
    e=$(date +%s%N)
    t2=$(rev)
    st=ok; { [ -n "$t" ] && [ "$t" = "$t2" ]; } || st=lost
    echo "etcdctl $$ ${t:-0} $s $e $st" >> "$LOG"' >/dev/null 2>&1 || sleep 0.1
done
'''


class Worker:
    def __init__(self, kind, argv, env=None):
        self.kind = kind
        self.argv = argv
        self.env = env
        self.proc = None
        self.kills = 0

    def start(self):
        self.proc = harness._popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)

    def kill(self):
        """SIGKILL the worker's whole process group (its flock, etcdctl,
        bash -c children too), by the group id this test created."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        harness._live.discard(self.proc)
        self.proc = None


def parse(log):
    secs = []
    with open(log) as f:
        for line in f:
            p = line.split()
            assert len(p) == 6, "torn log line %r" % line
            secs.append({"kind": p[0], "pid": int(p[1]), "token": int(p[2]), "start": int(p[3]),
                         "end": int(p[4]), "ok": p[5] == "ok"})
    return secs


def check(secs):
    ok = sorted((s for s in secs if s["ok"]), key=lambda s: s["start"])
    problems = []
    for a, b in zip(ok, ok[1:]):
        if b["start"] < a["end"]:
            problems.append("overlap: %s and %s" % (a, b))
        if b["token"] <= a["token"]:
            problems.append("token order: %s then %s" % (a, b))
    for s in ok:
        if s["token"] <= 0 or s["end"] < s["start"]:
            problems.append("bad section %s" % s)
    return ok, problems


@pytest.mark.cluster
@pytest.mark.timeout(int(SECONDS) + 180)
def test_lock_safety_under_chaos(etcd_cluster, coordfs_mount, tmp_path):
    cl = etcd_cluster
    rnd = random.Random(int(os.environ.get("COORD_CHAOS_SEED", str(int(time.time())))))
    ttl = "%ds" % TTL_S
    ma = coordfs_mount(cl.all_endpoints, "--lock-ttl", ttl)
    mb = coordfs_mount(cl.all_endpoints, "--lock-ttl", ttl)
    log = str(tmp_path / "sections.log")
    open(log, "w").close()
    env = harness.prog_env(endpoints=cl.all_endpoints)
    env["ETCDCTL_API"] = "3"
    locker = harness.build_path("tests/chaos_locker")
    workers = (
        [Worker("flock", ["bash", "-c", FLOCK_WORKER, "flock", ma.join("locks", "chaos"), log]) for _ in range(2)]
        + [Worker("open", [sys.executable, "-c", OPEN_WORKER, mb.join("locks", "chaos"), log]) for _ in range(2)]
        + [Worker("libcoord", [locker, "chaos", log, str(TTL_S * 1000), "40000"], env) for _ in range(2)]
        + [Worker("etcdctl", ["bash", "-c", ETCDCTL_WORKER, "etcdctl", cl.all_endpoints, log, str(TTL_S)], env)])
    restarts = 0
    try:
        for w in workers:
            w.start()
        t0 = time.monotonic()
        next_member = t0 + 8
        while time.monotonic() - t0 < SECONDS:
            time.sleep(rnd.uniform(0.5, 2.0))
            w = rnd.choice(workers)
            w.kill()
            w.kills += 1
            w.start()
            if time.monotonic() >= next_member and time.monotonic() - t0 < SECONDS - 5:
                m = rnd.choice(cl.members)
                m.kill()
                time.sleep(rnd.uniform(0.2, 1.5))
                cl.start_member(m, timeout=30)
                restarts += 1
                next_member = time.monotonic() + rnd.uniform(8, 15)
    finally:
        for w in workers:
            w.kill()
    # killed holders' leases run out; coordfs released its own at close
    wait_for(lambda: not cl.get_prefix("/locks/chaos/"), (TTL_S + 10) * (3 if harness.SANITIZE else 1), 0.2,
             "no key left under /locks/chaos/")
    secs = parse(log)
    ok, problems = check(secs)
    by_kind = {k: sum(1 for s in ok if s["kind"] == k) for k in ("flock", "open", "libcoord", "etcdctl")}
    lost = len(secs) - len(ok)
    lost_by = {k: sum(1 for s in secs if not s["ok"] and s["kind"] == k) for k in by_kind}
    line = ("chaos %.0f s: %d sections (%s), %d lost and flagged by their holder (%s), %d worker kills, "
            "%d etcd member restarts, %d problems" % (
                SECONDS, len(ok), ", ".join("%s %d" % kv for kv in by_kind.items()), lost,
                ", ".join("%s %d" % kv for kv in lost_by.items() if kv[1]) or "none",
                sum(w.kills for w in workers), restarts, len(problems)))
    print(line)
    try:
        with open(os.path.join(harness.build_dir(), "reliability.txt"), "a") as f:
            f.write("%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), line))
    except OSError:
        pass
    assert not problems, "\n".join(problems[:20])
    assert len(ok) >= 20, line
    for k, n in by_kind.items():
        assert n >= 1, "no %s section completed: %s" % (k, line)
