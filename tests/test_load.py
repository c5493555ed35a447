"""test_load.py — 100 concurrent processes on one coordfs mount.

Each process loops for COORD_LOAD_SECONDS (10 s in `make test`, 60 s in
`make soak`) over a random mix of:

  read      cat of one of 50 shared config keys (/config/load/shared/kNN)
  write     a whole new value to one of its own keys (open, write, close)
  lock      a lock cycle: open /locks/loadN (N of 10, so ten processes
            contend for each), write a note (which takes the lock), read
            its JSON, close
  register  write an instance document to /services/load/<id>, keep it
            open a moment, close (deregisters)

and records each operation's latency and every error.  Checked: no error
at all (nothing here fails on purpose), every process finished, the
writes are in etcd, no registration or lock key left, and coordfs's RSS
(VmRSS sampled every 0.5 s) is flat: its growth from the end of the first
third of the run to the end stays under 16 MiB.  p50/p99/max latency per
kind and the RSS are printed (and appended to $COORD_BUILD/reliability.txt).
"""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import harness
from harness import wait_for

SECONDS = float(os.environ.get("COORD_LOAD_SECONDS", "10"))
PROCS = int(os.environ.get("COORD_LOAD_PROCS", "100"))

WORKER = r'''
import errno, json, os, random, sys, time
mnt, idx, start_at, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rnd = random.Random(idx)
cfg = os.path.join(mnt, "config", "load")
lat = {"read": [], "write": [], "lock": [], "register": []}
errors = []
writes = {}
while time.time() < start_at:
    time.sleep(0.01)
end = time.time() + seconds
n = 0
while time.time() < end:
    kind = rnd.choices(["read", "write", "lock", "register"], [50, 30, 12, 8])[0]
    n += 1
    t = time.perf_counter()
    try:
        if kind == "read":
            with open(os.path.join(cfg, "shared", "k%02d" % rnd.randrange(50)), "rb") as f:
                if not f.read().startswith(b"shared"):
                    errors.append("read: bad value")
        elif kind == "write":
            k = "p%03d/k%d" % (idx, rnd.randrange(5))
            v = "v%d-%d" % (idx, n)
            fd = os.open(os.path.join(cfg, k), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, v.encode())
            finally:
                os.close(fd)
            writes[k] = v
        elif kind == "lock":
            fd = os.open(os.path.join(mnt, "locks", "load%d" % (idx % 10)), os.O_RDWR)
            try:
                os.write(fd, b"load %d" % idx)  # writing takes the lock
                info = json.loads(os.pread(fd, 65536, 0))
                if not info.get("held_by_me"):
                    errors.append("lock: not held_by_me: %s" % info)
            finally:
                os.close(fd)
        else:
            fd = os.open(os.path.join(mnt, "services", "load", "i%03d" % idx), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, json.dumps({"address": "10.0.%d.%d" % (idx // 250, idx % 250 + 1),
                                         "port": 8000 + idx}).encode())
                time.sleep(0.01)
            finally:
                os.close(fd)
    except OSError as e:
        errors.append("%s: %s" % (kind, e))
    lat[kind].append(time.perf_counter() - t)
print(json.dumps({"idx": idx, "ops": n, "lat": lat, "errors": errors, "writes": writes}))
'''


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pct(xs, p):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


@pytest.mark.timeout(int(SECONDS) + 240)
def test_100_processes_mixed_load(etcd, coordfs_mount):
    for i in range(50):
        etcd.put("/config/load/shared/k%02d" % i, "shared %d" % i)
    for i in range(PROCS):
        etcd.put("/config/load/p%03d/k0" % i, "init")  # each process's own directory
    m = coordfs_mount(etcd, "--lock-ttl", "5s", "--service-ttl", "5s")
    wait_for(lambda: len(os.listdir(m.join("config", "load"))) == PROCS + 1, 20, what="load tree")
    start_at = time.time() + 3.0 + PROCS * 0.03
    procs = []
    for i in range(PROCS):
        procs.append(harness._popen([sys.executable, "-c", WORKER, m.path, str(i), repr(start_at), str(SECONDS)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True))
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            r = rss_kb(m.pid)
            if r:
                samples.append((time.time(), r))
            stop.wait(0.5)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    results, failures = [], []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=SECONDS + 120)
            except subprocess.TimeoutExpired:
                failures.append("worker %d hung" % p.pid)
                continue
            if p.returncode != 0 or not out.strip():
                failures.append("worker exit %s: %s" % (p.returncode, err[-500:]))
                continue
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        stop.set()
        th.join(5)
        for p in procs:
            harness.end_process(p, signal.SIGKILL)
    assert not failures, failures[:5]
    errors = [e for r in results for e in r["errors"]]
    assert not errors, "%d errors, e.g. %s" % (len(errors), errors[:10])
    # every process's last write of each key is in etcd
    stored = etcd.get_prefix("/config/load/")
    for r in results:
        for k, v in r["writes"].items():
            assert stored.get("/config/load/" + k) == v, (k, v, stored.get("/config/load/" + k))
    wait_for(lambda: not etcd.get_prefix("/services/load/") and not etcd.get_prefix("/locks/"), 15, 0.2,
             "no registration or lock key left")
    # memory: flat after the warm-up (first third of the run)
    run = [(t, r) for t, r in samples if start_at <= t <= start_at + SECONDS]
    assert len(run) >= 4, samples
    warm = [r for t, r in run if t >= start_at + SECONDS / 3]
    base, last, peak = warm[0], run[-1][1], max(r for _, r in run)
    lat = {k: [x for r in results for x in r["lat"][k]] for k in ("read", "write", "lock", "register")}
    total = sum(r["ops"] for r in results)
    figures = ", ".join("%s p50 %.1f ms p99 %.1f ms max %.0f ms (%d)" % (
        k, 1000 * pct(v, 50), 1000 * pct(v, 99), 1000 * max(v or [0]), len(v)) for k, v in lat.items())
    line = ("load %d processes x %.0f s: %d ops (%.0f/s), 0 errors; %s; coordfs RSS %.1f MiB after warm-up, "
            "%.1f MiB at the end, peak %.1f MiB" % (PROCS, SECONDS, total, total / SECONDS, figures, base / 1024.0,
                                                   last / 1024.0, peak / 1024.0))
    print(line)
    try:
        with open(os.path.join(harness.build_dir(), "reliability.txt"), "a") as f:
            f.write("%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), line))
    except OSError:
        pass
    if not harness.SANITIZE:  # ASan's quarantine and shadow memory grow by design
        assert last - base < 16 * 1024, "coordfs RSS grew %d KiB under steady load: %s" % (last - base, run)


def vm_kb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


@pytest.mark.skipif(harness.SANITIZE, reason="ASan's allocator does not give memory back to the system")
def test_memory_of_the_initial_load_is_given_back(etcd, coordfs_mount):
    """Loading a large tree frees more than it keeps (the Range answer, its
    decoding, the watch's seed read); coordfs gives that back once quiet
    (events.c, malloc_trim), instead of keeping its peak for ever."""
    gw = etcd.members[0].client_url + "/v3/kv/txn"
    b = lambda s: base64.b64encode(s.encode()).decode()
    for t in range(250):  # 30,000 keys of 100 bytes, 120 puts per Txn
        ops = [{"request_put": {"key": b("/config/big/d%03d/k%05d" % (t, t * 120 + i)), "value": b("v" * 100)}}
               for i in range(120)]
        urllib.request.urlopen(urllib.request.Request(gw, data=json.dumps({"success": ops}).encode()),
                               timeout=30).read()
    m = coordfs_mount(etcd)
    assert len(os.listdir(m.join("config", "big"))) == 250
    deadline = time.monotonic() + 15
    while True:
        rss, peak = vm_kb(m.pid, "VmRSS"), vm_kb(m.pid, "VmHWM")
        if rss < 0.75 * peak or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print("memory after load of 30,000 keys: %d KiB resident, peak %d KiB" % (rss, peak))
    assert rss < 0.75 * peak, "coordfs keeps %d KiB of its %d KiB peak after the load" % (rss, peak)
