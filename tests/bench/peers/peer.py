#!/usr/bin/python3
"""peer.py — the python3-etcd3 peer of `make bench` (issue 7).

Debian's python3-etcd3 (0.12) on /usr/bin/python3.  One workload per run; the
result is one JSON line on stdout, in the same form as the Go peer and
tests/bench/coord_bench.c:
  {"impl":"python","workload":"put_seq","n":..,"p50_us":..,"p99_us":..,"ops_s":..}
python-etcd3's Lock is its own recipe (one key per lock name, a new lease per
acquire, polling with a watch), not etcd's concurrency Mutex; it is still what
a Python user would reach for.
"""
import argparse
import json
import queue
import sys
import threading
import time

try:
    import etcd3
except ImportError as e:  # reported, never fatal for the bench
    print(json.dumps({"impl": "python", "workload": sys.argv[-1], "error": "no etcd3: %s" % e}))
    sys.exit(1)

WORKLOADS = ["put_seq", "get_lin", "get_ser", "put_conc", "get_conc", "lock_cycle", "lock_handoff", "watch", "fill"]


def acquire_waiting(lk, timeout):
    """python-etcd3 0.12's Lock.acquire with its retry loop written out.  The
    library's own hands tenacity a wait() of an older signature and raises
    TypeError on its first retry with Debian's tenacity, i.e. as soon as the
    lock is contended.  Same requests, same order: a lease, the Txn, and on
    failure a watch_once on the key before trying again."""
    c = lk.etcd_client
    deadline = time.monotonic() + timeout
    while True:
        lk.lease = c.lease(lk.ttl)
        ok, _ = c.transaction(
            compare=[c.transactions.create(lk.key) == 0],
            success=[c.transactions.put(lk.key, lk.uuid, lease=lk.lease)],
            failure=[c.transactions.get(lk.key)],
        )
        if ok:
            return True
        lk.lease = None
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            c.watch_once(lk.key, left)
        except etcd3.exceptions.WatchTimedOut:
            pass


def pct(s, p):
    return s[int(p * (len(s) - 1) + 0.5)] if s else 0.0


def emit(args, lat_ns, wall_s):
    us = sorted(x / 1000.0 for x in lat_ns)
    r = {"impl": "python", "workload": args.workload, "n": len(us)}
    if us:
        r.update(p50_us=pct(us, 0.5), p99_us=pct(us, 0.99), mean_us=sum(us) / len(us))
    if wall_s > 0:
        r["ops_s"] = len(us) / wall_s
    r["wall_s"] = wall_s
    r["lat_us"] = [round(x / 1000.0, 2) for x in lat_ns]  # every sample, for merging rounds
    print(json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", default="127.0.0.1:2379")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--conc", type=int, default=64)
    ap.add_argument("--prefix", default="/bench/python")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--hold-ms", type=int, default=120, help="lock_handoff: hold after the waiter queued")
    ap.add_argument("--dirs", type=int, default=100, help="fill: keys spread over this many directories")
    ap.add_argument("workload", choices=WORKLOADS)
    args = ap.parse_args()
    host, port = args.endpoints.split(",")[0].rsplit(":", 1)
    cli = etcd3.client(host=host, port=int(port), timeout=10)
    val = b"v" * args.value_size
    key = args.prefix + "/key"
    cli.put(key, val)
    now = time.perf_counter_ns
    w = args.workload
    lat = []

    if w in ("put_seq", "get_lin", "get_ser"):
        start = now()
        for i in range(args.n):
            t0 = now()
            if w == "put_seq":
                cli.put("%s/k%d" % (args.prefix, i % 1000), val)
            elif w == "get_lin":
                cli.get(key)
            else:
                cli.get(key, serializable=True)
            lat.append(now() - t0)
        emit(args, lat, (now() - start) / 1e9)

    elif w in ("put_conc", "get_conc"):
        counter = iter(range(args.n))
        lock = threading.Lock()
        errors = []

        def worker():
            mine = []
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                t0 = now()
                try:
                    if w == "put_conc":
                        cli.put("%s/c%d" % (args.prefix, i % 1000), val)
                    else:
                        cli.get(key)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
                    break
                mine.append(now() - t0)
            with lock:
                lat.extend(mine)

        ts = [threading.Thread(target=worker) for _ in range(args.conc)]
        start = now()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = (now() - start) / 1e9
        if errors:
            raise errors[0]
        emit(args, lat, wall)

    elif w == "lock_cycle":
        lk = cli.lock(args.prefix.strip("/").replace("/", "-") + "-lock", ttl=10)
        start = now()
        for _ in range(args.n):
            t0 = now()
            if not lk.acquire(timeout=10):
                raise SystemExit("lock timeout")
            lk.release()
            lat.append(now() - t0)
        emit(args, lat, (now() - start) / 1e9)

    elif w == "lock_handoff":
        name = args.prefix.strip("/").replace("/", "-") + "-handoff"
        locks = [cli.lock(name, ttl=10), cli.lock(name, ttl=10)]
        locks[0].acquire(timeout=10)
        h = 0
        start = now()
        for _ in range(args.n):
            wi = 1 - h
            got = queue.Queue()

            def wait_turn(lk=locks[wi]):
                try:
                    if not acquire_waiting(lk, 30):
                        raise TimeoutError("no lock in 30 s")
                    got.put(now())
                except Exception as e:  # noqa: BLE001 -- handed to the main thread
                    got.put(e)

            t = threading.Thread(target=wait_turn)
            t.start()
            # python-etcd3's waiter has no key of its own to poll for: the
            # hold covers its reaching the watch.
            time.sleep(args.hold_ms / 1000.0)
            t0 = now()
            locks[h].release()
            t1 = got.get(timeout=30)
            t.join()
            if isinstance(t1, Exception):
                raise RuntimeError("python-etcd3 Lock.acquire under contention: %s: %s" % (type(t1).__name__, t1))
            lat.append(t1 - t0)
            h = wi
        wall = (now() - start) / 1e9
        locks[h].release()
        emit(args, lat, wall)

    elif w == "watch":
        wkey = args.prefix + "/watched"
        q = queue.Queue()
        wid = cli.add_watch_callback(wkey, lambda resp: q.put(now()))
        cli.put(wkey, b"warmup")
        q.get(timeout=10)
        start = now()
        for i in range(args.n):
            t0 = now()
            cli.put(wkey, str(i).encode())
            t1 = q.get(timeout=10)
            lat.append(t1 - t0)
        wall = (now() - start) / 1e9
        cli.cancel_watch(wid)
        emit(args, lat, wall)

    elif w == "fill":
        # n keys of value-size bytes under <prefix>/dNN/kNNNNNN, 128 puts a Txn.
        start = now()
        ops = []
        for i in range(args.n):
            k = "%s/d%02d/k%06d" % (args.prefix, i % args.dirs, i)
            ops.append(cli.transactions.put(k, val))
            if len(ops) == 128:
                cli.transaction(compare=[], success=ops, failure=[])
                ops = []
        if ops:
            cli.transaction(compare=[], success=ops, failure=[])
        emit(args, [], (now() - start) / 1e9)

    cli.close()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 -- reported as the workload's error
        print(json.dumps({"impl": "python", "workload": sys.argv[-1], "error": "%s: %s" % (type(e).__name__, e)}))
        sys.exit(1)
