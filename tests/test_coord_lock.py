"""test_coord_lock.py — the coord-lock tool and the lease deadline API under
it (coord_lease_deadline, coord_lock_deadline), against a real etcd.

coord-lock NAME -- CMD: CMD runs holding the lock (COORD_LOCK_TOKEN/KEY/NAME
in its environment), its status comes back, -n / -w / -E, usage and etcd
errors, signals forwarded, CMD dies with a SIGKILLed coord-lock, mutual
exclusion between coord-lock runs and with `etcdctl lock`, auth without the
password in argv.

The point of the tool is the partition tests: coord-lock A holds the lock
through a TCP proxy (Proxy below: loopback, in this process) and runs a CMD
that logs its start, a heartbeat every 50 ms and (in a TERM trap) its end;
coord-lock B waits for the same lock straight on etcd.  The proxy is cut
("blackhole": no byte moves either way and connections stay open, so
renewals hang; "refuse": every connection is reset and new ones refused, so
renewals fail at once).  A's lease expires in etcd and B gets the lock: B's
CMD must start only after A's CMD and every process it started ended
(`kill -0` on A's CMD fails, its last heartbeat and its end come before B's
start).  Also with a CMD that ignores SIGTERM (SIGKILL needed), and a run
several TTLs long without a cut that must not be touched.

tests/c/lock_deadline.c checks the API: every error path, values while
renewals succeed (never above the TTL nor above etcd's own TimeToLive,
never below ~2/3 TTL), unknown before the first renewal (etcd frozen), and
through the cut proxy: the instant until which A's deadline promised the
lock comes before the instant B got it.
"""

import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import queue

import pytest

import harness
from harness import end_process, finish_prog, require_build, run_prog, start_prog, wait_for

TOOL = "coord-lock"
DL = "tests/lock_deadline"


@pytest.fixture(autouse=True)
def _built():
    require_build(TOOL)
    require_build(DL)


def lock_keys(etcd, name):
    return etcd.get_prefix("/locks/%s/" % name)


def wait_keys(etcd, name, n, timeout=15.0):
    wait_for(lambda: len(lock_keys(etcd, name)) == n, timeout, 0.05, "%d keys under /locks/%s/" % (n, name))


def cl(etcd, *args, expect_rc=0, timeout=60.0, env=None, check=True):
    """Run coord-lock ARGS against etcd (an EtcdCluster or "host:port");
    returns the CompletedProcess (sanitizer reports always fail)."""
    return run_prog(TOOL, *args, endpoints=etcd, expect_rc=expect_rc, timeout=timeout, env=env, check=check,
                    result=True)


def start_cl(etcd, *args, env=None):
    return start_prog(TOOL, *args, endpoints=etcd, env=env)


def sh(script):
    return ["sh", "-c", script]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not running any more
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


class Lines:
    """A running C program whose stdout lines a thread reads into a queue."""

    def __init__(self, prog, *args, endpoints=None):
        self.p = start_prog(prog, *args, endpoints=endpoints, stdin=subprocess.PIPE)
        self.q = queue.Queue()
        self.seen = []
        self.err = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.t_err = threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True)
        self.t_err.start()

    def _pump(self):
        for line in self.p.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def expect(self, prefix, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None:
                self.q.put(None)
                raise AssertionError("exited (rc %s) before %r; stderr %s" % (self.p.poll(), prefix,
                                                                              "".join(self.err)[-2000:]))
            if line:
                self.seen.append(line)
                if line.startswith(prefix):
                    return line.split()
            if time.monotonic() >= deadline:
                raise AssertionError("no %r within %ss (last %r)" % (prefix, timeout, self.seen[-5:]))

    def send(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def finish(self, timeout=60.0):
        """EOF on stdin, wait; returns every line seen (checks sanitizers, rc 0)."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            end_process(self.p, signal.SIGKILL)
            raise AssertionError("did not exit; last lines %r" % self.seen[-5:])
        while True:
            line = self.q.get(timeout=10)
            if line is None:
                break
            self.seen.append(line)
        self.t_err.join(5)
        err = "".join(self.err)
        assert harness.sanitizer_report(err) is None, harness.sanitizer_report(err)
        assert self.p.returncode == 0, (self.p.returncode, err[-2000:])
        return self.seen


# ------------------------------------------------------------------ the proxy


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of one etcd member.  cut("blackhole")
    stops moving bytes in both directions but keeps every connection open
    (new ones are accepted and held): a partition in which requests hang.
    cut("refuse") resets every connection (SO_LINGER 0) and stops listening:
    requests fail at once and reconnects are refused."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.endpoint = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.mode = None  # None: forwarding
        self.socks = []
        self.mu = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _keep(self, *ss):
        with self.mu:
            self.socks.extend(ss)

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self._keep(c)
            if self.mode is not None:
                continue  # blackhole: held, never forwarded
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            self._keep(u)
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, a, b):
        while not self.closed:
            if self.mode is not None:
                if self.mode == "refuse":
                    return
                time.sleep(0.05)  # blackhole: the bytes stay in the kernel's buffers
                continue
            try:
                r, _, _ = select.select([a, b], [], [], 0.05)
            except (OSError, ValueError):
                return
            for s in r:
                if self.mode is not None:
                    break
                other = b if s is a else a
                try:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("closed")
                    other.sendall(data)
                except OSError:
                    for x in (a, b):
                        try:
                            x.close()
                        except OSError:
                            pass
                    return

    def _drop_all(self, reset):
        """Stop listening and close every connection (reset: with RST)."""
        try:
            self.lsock.close()
        except OSError:
            pass
        with self.mu:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def cut(self, mode):
        assert mode in ("blackhole", "refuse")
        self.mode = mode
        if mode == "refuse":
            self._drop_all(reset=True)

    def close(self):
        self.closed = True
        self._drop_all(reset=False)


@pytest.fixture
def proxy(etcd):
    p = Proxy(etcd.endpoint)
    yield p
    p.close()


def test_proxy_forwards_and_cuts(etcd, proxy, tmp_path):
    """The proxy itself: forwards, then cut('refuse') makes coord-lock fail
    to reach etcd (the partition tests rely on both)."""
    r = cl(proxy.endpoint, "px", "--", "true")
    assert r.returncode == 0
    proxy.cut("refuse")
    r = cl(proxy.endpoint, "px", "--", "true", expect_rc=69)
    assert "cannot reach etcd" in r.stderr


# ------------------------------------------------------------------ the API (C)


def test_deadline_api_checks(etcd):
    """coord_lease_deadline / coord_lock_deadline: every error path, and the
    values while renewals succeed (tests/c/lock_deadline.c)."""
    out = run_prog(DL, "checks", "t1", endpoints=etcd, timeout=120)
    assert "FAIL" not in out, out
    assert "PASSED" in out


def test_deadline_unknown_until_first_renewal(etcd):
    """A lease given to coord_lease_keepalive has no known deadline until
    etcd answers its first renewal (etcd frozen meanwhile): COORD_EUNAVAILABLE,
    then 0 with the TTL granted once etcd answers."""
    t = Lines(DL, "fresh", 3000, endpoints=etcd)
    t.expect("GRANTED")
    m = etcd.members[0]
    m.pause()
    try:
        t.send("go")
        assert t.expect("FRESH") == ["FRESH", "-3"]  # COORD_EUNAVAILABLE
    finally:
        m.resume()
    t.send("go")
    w = t.expect("KNOWN")
    assert w[1] == "0", w
    assert 0 < int(w[2]) <= 3000 and int(w[3]) == 3000, w
    t.finish()


@pytest.mark.timeout(180)
def test_deadline_promise_ends_before_anyone_else_holds(etcd, proxy):
    """The API's promise under a partition: A holds through the proxy and
    samples coord_lock_deadline every 20 ms; the proxy is cut; B gets the
    lock straight from etcd after A's lease expired there.  The latest
    instant A's deadline promised (sample time + ms_left, CLOCK_MONOTONIC
    like B's) is before the instant B held the lock; A's deadline ran down
    to 0 and A was told it lost the lock."""
    a = Lines(DL, "hold", "dl", 3000, endpoints=proxy.endpoint)
    a.expect("ACQUIRED")
    for _ in range(20):  # some samples while renewals succeed
        a.expect("DL")
    b = start_prog(DL, "acquire", "dl", endpoints=etcd)
    wait_keys(etcd, "dl", 2)
    proxy.cut("blackhole")
    out, _ = finish_prog(b, timeout=60)
    b_at = int(out.split()[1])
    a.expect("LOST", 30)
    lines = a.finish()
    samples = [(int(w[1]), int(w[2]), int(w[3])) for w in (l.split() for l in lines) if w[0] == "DL"]
    held = [(t, left) for t, rc, left in samples if rc == 0]
    promised = max(t + left for t, left in held)
    assert promised <= b_at, "A's deadline promised the lock until %d, B held it at %d" % (promised, b_at)
    assert min(left for _, left in held) < 1000, "the deadline never ran down: %r" % held[-5:]
    assert any(rc == -11 for _, rc, _ in samples), "coord_lock_deadline never said COORD_ELOST"
    # once lost, never "held" again
    first_lost = next(i for i, s in enumerate(samples) if s[1] != 0)
    assert all(rc != 0 for _, rc, _ in samples[first_lost:])


# ------------------------------------------------------------------ basics


def test_cmd_gets_token_key_name_and_status(etcd, tmp_path):
    """CMD runs holding the lock: COORD_LOCK_KEY is the holder key in etcd,
    COORD_LOCK_TOKEN its create revision, tokens grow from run to run; CMD's
    exit status (and 128+N for a signal) is coord-lock's; the key is gone
    afterwards."""
    script = ('echo "$COORD_LOCK_TOKEN $COORD_LOCK_KEY $COORD_LOCK_NAME"; '
              'ETCDCTL_API=3 %s --endpoints %s get "$COORD_LOCK_KEY" -w fields | '
              'sed -n "s/^\\"CreateRevision\\" : //p"; exit 7') % (harness.ETCDCTL, etcd.endpoint)
    tokens = []
    for _ in range(2):
        r = cl(etcd, "envt", "--", *sh(script), expect_rc=7)
        first, created = r.stdout.splitlines()[:2]
        token, key, name = first.split()
        assert re.fullmatch(r"/locks/envt/[0-9a-f]+", key), key
        assert name == "envt"
        assert int(token) == int(created), (token, created)
        tokens.append(int(token))
    assert tokens[1] > tokens[0]
    assert lock_keys(etcd, "envt") == {}
    cl(etcd, "envt", *sh("kill -9 $$"), expect_rc=137)  # "--" is optional
    cl(etcd, "envt", "--", "true")
    cl(etcd, "envt", "--", "false", expect_rc=1)
    assert lock_keys(etcd, "envt") == {}


def test_prefix_and_ttl(etcd):
    """--prefix puts the lock under the namespace (COORD_LOCK_KEY has it);
    --ttl sets the holder's lease TTL."""
    script = ('echo "$COORD_LOCK_KEY"; ETCDCTL_API=3 %s --endpoints %s lease timetolive '
              '$(basename "$COORD_LOCK_KEY")') % (harness.ETCDCTL, etcd.endpoint)
    r = cl(etcd, "--prefix", "/app1", "--ttl", "7s", "pfx", "--", *sh(script))
    key, ttl_line = r.stdout.splitlines()[:2]
    assert key.startswith("/app1/locks/pfx/"), key
    assert "granted with TTL(7s)" in ttl_line, ttl_line
    r = cl(etcd, "--ttl", "2500ms", "pfx", "--", *sh(script))
    assert "granted with TTL(3s)" in r.stdout, r.stdout  # rounded up to whole seconds


@pytest.mark.timeout(240)
def test_mutual_exclusion(etcd, tmp_path):
    """4 shell loops x 8 runs of coord-lock, each CMD a non-atomic
    read-sleep-increment-write of one file: the count is exact, and the
    tokens, logged in the order the critical sections ran, grow."""
    counter = tmp_path / "n"
    counter.write_text("0")
    log = tmp_path / "tokens"
    rounds, workers = 8, 4
    cs = 'v=$(cat %s); sleep 0.02; echo $((v+1)) > %s; echo $COORD_LOCK_TOKEN >> %s' % (counter, counter, log)
    loop = 'for i in $(seq %d); do "$0" mx -- sh -c "$1" || exit 1; done' % rounds
    env = harness.prog_env(endpoints=etcd.endpoints)
    ps = [subprocess.Popen(["sh", "-c", loop, harness.build_path(TOOL), cs], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    for p in ps:
        out, err = p.communicate(timeout=200)
        assert harness.sanitizer_report(err) is None, harness.sanitizer_report(err)
        assert p.returncode == 0, err[-2000:]
    assert int(counter.read_text()) == rounds * workers
    tokens = [int(x) for x in log.read_text().split()]
    assert len(tokens) == rounds * workers
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert lock_keys(etcd, "mx") == {}


def hold(etcd, name, tmp_path, *opts):
    """A coord-lock holding name with a CMD that runs until `release` exists.
    Returns (process, path of the release file)."""
    started, release = tmp_path / ("%s.started" % name), tmp_path / ("%s.release" % name)
    p = start_cl(etcd, *opts, name, "--",
                 *sh('touch %s; while [ ! -e %s ]; do sleep 0.02; done' % (started, release)))
    wait_for(lambda: started.exists() or p.poll() is not None, 30, what="holder's CMD to start")
    assert p.poll() is None, finish_prog(p, check=False)
    return p, release


def test_nonblock_on_held_lock(etcd, tmp_path):
    """-n on a held lock: exit 1 at once (or -E's code), CMD not run, no key
    left behind; the holder is not disturbed."""
    p, release = hold(etcd, "nb", tmp_path)
    marker = tmp_path / "ran"
    t0 = time.monotonic()
    r = cl(etcd, "-n", "nb", "--", "touch", str(marker), expect_rc=1)
    assert time.monotonic() - t0 < 15
    assert "held" in r.stderr
    cl(etcd, "-E", "42", "--nonblock", "nb", "--", "touch", str(marker), expect_rc=42)
    cl(etcd, "-w", "0", "nb", "--", "touch", str(marker), expect_rc=1)  # -w 0 is -n
    assert not marker.exists()
    assert len(lock_keys(etcd, "nb")) == 1
    release.touch()
    finish_prog(p, timeout=30)
    cl(etcd, "-n", "nb", "--", "touch", str(marker))
    assert marker.exists()


def test_wait_times_out_then_gets_it(etcd, tmp_path):
    """-w 1 on a held lock: gives up after about a second with exit 1 (the
    waiter's key withdrawn, CMD not run); -w 30 gets it once the holder
    ends, and runs CMD."""
    p, release = hold(etcd, "wt", tmp_path)
    marker = tmp_path / "ran"
    t0 = time.monotonic()
    r = cl(etcd, "-w", "1", "wt", "--", "touch", str(marker), expect_rc=1)
    took = time.monotonic() - t0
    assert 1.0 <= took < 20, took
    assert "timed out" in r.stderr
    assert not marker.exists()
    assert len(lock_keys(etcd, "wt")) == 1
    w = start_cl(etcd, "-w", "30", "wt", "--", "touch", str(marker))
    wait_keys(etcd, "wt", 2)
    time.sleep(0.3)
    assert not marker.exists()
    release.touch()
    finish_prog(p, timeout=30)
    finish_prog(w, timeout=30)
    assert marker.exists()
    assert lock_keys(etcd, "wt") == {}


def etcdctl_lock(etcd, name):
    """`etcdctl lock /locks/NAME`, holding until SIGTERM once it printed its key."""
    env = dict(os.environ, ETCDCTL_API="3")
    p = harness._popen(etcd.etcdctl_argv() + ["lock", "/locks/" + name], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                       start_new_session=True)
    return p


def test_excludes_etcdctl_lock_both_ways(etcd, tmp_path):
    """etcdctl lock /locks/NAME holds: coord-lock -n fails, a waiting
    coord-lock runs CMD only after etcdctl lets go.  coord-lock holds:
    etcdctl lock waits until CMD has ended."""
    e = etcdctl_lock(etcd, "ex")
    first = wait_for(lambda: e.stdout.readline(), 20, what="etcdctl lock's key")
    assert first.startswith("/locks/ex/"), first
    cl(etcd, "-n", "ex", "--", "true", expect_rc=1)
    marker = tmp_path / "ran"
    w = start_cl(etcd, "ex", "--", "touch", str(marker))
    wait_keys(etcd, "ex", 2)
    time.sleep(0.5)
    assert not marker.exists()
    end_process(e)
    finish_prog(w, timeout=30)
    assert marker.exists()

    p, release = hold(etcd, "ex2", tmp_path)
    e = etcdctl_lock(etcd, "ex2")
    got = []
    threading.Thread(target=lambda: got.append(e.stdout.readline()), daemon=True).start()
    wait_keys(etcd, "ex2", 2)
    time.sleep(0.5)
    assert not got, "etcdctl lock got the lock while coord-lock's CMD ran"
    release.touch()
    finish_prog(p, timeout=30)
    wait_for(lambda: got, 20, what="etcdctl lock to get the lock")
    assert got[0].startswith("/locks/ex2/")
    end_process(e)


def test_auth_password_never_in_argv(etcd, tmp_path):
    """With etcd auth on: --user and --password-file (or $COORD_PASSWORD)
    work, the password is in no argv (CMD reads coord-lock's
    /proc/PPID/cmdline); a wrong password is exit 69, so is a user that may
    not write /locks/ (waiting or -n); --user alone is a usage error."""
    etcd.add_user("locker", "s3cret-pw", prefix="/locks/")
    etcd.add_user("outsider", "other-pw", prefix="/config/")
    etcd.enable_auth()
    pwfile = tmp_path / "pw"
    pwfile.write_text("s3cret-pw\n")
    show = sh("tr '\\0' ' ' < /proc/$PPID/cmdline")
    r = cl(etcd, "--user", "locker", "--password-file", str(pwfile), "au", "--", *show)
    assert "--user locker" in r.stdout and "s3cret" not in r.stdout, r.stdout
    env = harness.prog_env()
    env["COORD_PASSWORD"] = "s3cret-pw"
    r = cl(etcd, "--user", "locker", "au", "--", *show, env=env)
    assert "s3cret" not in r.stdout
    env["COORD_PASSWORD"] = "wrong"
    r = cl(etcd, "--user", "locker", "au", "--", "true", env=env, expect_rc=69)
    assert "cannot reach etcd" in r.stderr
    env["COORD_PASSWORD"] = "other-pw"
    for opt in ([], ["-n"]):
        r = cl(etcd, "--user", "outsider", *opt, "au", "--", "touch", str(tmp_path / "ran"), env=env, expect_rc=69)
        assert "cannot take lock au" in r.stderr, r.stderr
    assert not (tmp_path / "ran").exists()
    env.pop("COORD_PASSWORD")
    r = cl(etcd, "--user", "locker", "au", "--", "true", env=env, expect_rc=64)
    assert "--password-file" in r.stderr
    cl(etcd, "--user", "locker", "--password-file", str(tmp_path / "none"), "au", "--", "true", expect_rc=64)


def test_tls(etcd_tls):
    """--cacert, --cert and --key reach an etcd that requires client
    certificates; without them coord-lock cannot reach it (69)."""
    c = etcd_tls.certs
    r = cl(etcd_tls, "--cacert", c.ca, "--cert", c.client_cert, "--key", c.client_key, "tls", "--",
           *sh("echo $COORD_LOCK_TOKEN"))
    assert int(r.stdout) > 0
    cl(etcd_tls, "tls", "--", "true", expect_rc=69)


def test_usage_and_startup_errors(etcd, tmp_path):
    """Usage errors are 64; CMD not found 127, not executable 126 (the lock is
    released either way); etcd unreachable 69; the help is exit 0."""
    for args in [[], ["nm"], ["nm", "--"], ["-n", "-w", "1", "nm", "true"], ["-w", "x", "nm", "true"],
                 ["--ttl", "0", "nm", "true"], ["a/b", "true"], ["", "true"], ["-E", "300", "nm", "true"],
                 ["--ttl", "3", "--term-before", "3", "nm", "true"],
                 ["--term-before", "1", "--kill-before", "1", "nm", "true"], ["--bogus", "nm", "true"],
                 ["--kill-before", "0", "nm", "true"]]:
        r = cl(etcd, *args, expect_rc=64)
        assert r.stderr.startswith("coord-lock: "), (args, r.stderr)
    r = cl(etcd, "--help")
    assert "usage: coord-lock" in r.stdout
    r = cl(etcd, "nm", "--", str(tmp_path / "no-such-cmd"), expect_rc=127)
    assert "No such file" in r.stderr
    (tmp_path / "notexec").write_text("#!/bin/sh\n")
    cl(etcd, "nm", "--", str(tmp_path / "notexec"), expect_rc=126)
    assert lock_keys(etcd, "nm") == {}
    dead = "127.0.0.1:%d" % harness.free_port()
    r = cl(etcd, "--endpoints", dead, "nm", "--", "touch", str(tmp_path / "ran"), expect_rc=69)
    assert "cannot reach etcd" in r.stderr and not (tmp_path / "ran").exists()


def test_signals_forwarded_and_waiting_interrupted(etcd, tmp_path):
    """SIGTERM to coord-lock reaches CMD (its trap's status comes back) and
    the lock is released; SIGINT while waiting for the lock gives up (130),
    leaves no key and never runs CMD."""
    started = tmp_path / "started"
    p = start_cl(etcd, "sg", "--", *sh("trap 'exit 5' TERM; touch %s; while :; do sleep 0.05; done" % started))
    wait_for(started.exists, 30, what="CMD to start")
    harness.signal_pid(p, signal.SIGTERM)
    finish_prog(p, timeout=30, expect_rc=5)
    assert lock_keys(etcd, "sg") == {}

    h, release = hold(etcd, "sg", tmp_path)
    w = start_cl(etcd, "sg", "--", "touch", str(tmp_path / "ran"))
    wait_keys(etcd, "sg", 2)
    harness.signal_pid(w, signal.SIGINT)
    _, err = finish_prog(w, timeout=30, expect_rc=130)
    assert "giving up" in err
    wait_keys(etcd, "sg", 1)
    release.touch()
    finish_prog(h, timeout=30)
    assert not (tmp_path / "ran").exists()


def children(pid):
    """PIDs whose parent is pid (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_child_lost_while_waiting(etcd, tmp_path):
    """The child that is to run CMD is forked before gRPC starts and waits
    for the lock; if it dies meanwhile (killed here), coord-lock withdraws
    from the queue and exits 71."""
    h, release = hold(etcd, "ch", tmp_path)
    w = start_cl(etcd, "ch", "--", "touch", str(tmp_path / "ran"))
    wait_keys(etcd, "ch", 2)
    kids = children(w.pid)
    assert len(kids) == 1, kids
    os.kill(kids[0], signal.SIGKILL)
    _, err = finish_prog(w, timeout=30, expect_rc=71)
    assert "died" in err, err
    wait_keys(etcd, "ch", 1)
    release.touch()
    finish_prog(h, timeout=30)
    assert not (tmp_path / "ran").exists()


def test_cmd_dies_with_a_killed_coord_lock(etcd, tmp_path):
    """SIGKILL to coord-lock: CMD (PR_SET_PDEATHSIG) dies too, so it cannot
    run on after the lease that coord-lock no longer renews."""
    pidf = tmp_path / "pid"
    p = start_cl(etcd, "pd", "--", *sh("echo $$ > %s; exec sleep 1000" % pidf))
    wait_for(lambda: read(pidf).strip(), 30, what="CMD's pid")
    pid = int(read(pidf))
    assert alive(pid)
    end_process(p, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 10, what="CMD to die with coord-lock")


def test_lost_lock_kills_cmd_at_once(etcd, tmp_path):
    """The holder key deleted behind coord-lock's back (the lock is lost):
    CMD and the processes it started get SIGKILL at once; exit 75."""
    pidf = tmp_path / "pid"
    p = start_cl(etcd, "gone", "--", *sh("trap '' TERM; sleep 1000 >/dev/null 2>&1 & echo $! > %s; "
                                         "while :; do sleep 0.05; done" % pidf))
    wait_for(lambda: read(pidf).strip(), 30, what="CMD's background pid")
    bg = int(read(pidf))
    try:
        etcd.etcdctl("del", "--prefix", "/locks/gone/")
        _, err = finish_prog(p, timeout=30, expect_rc=75)
        assert "lock gone lost" in err and "sending SIGKILL" in err, err
        assert not alive(bg), "a process CMD started outlived the lost lock"
    finally:
        if alive(bg):
            os.kill(bg, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_healthy_long_run_is_not_killed(etcd, tmp_path):
    """Without a partition the watchdog stays quiet: a CMD that runs three
    TTLs (TTL 2 s, default margins) ends by itself with its status."""
    r = cl(etcd, "--ttl", "2", "long", "--", *sh("sleep 6; exit 3"), expect_rc=3, timeout=90)
    assert "SIGTERM" not in r.stderr and "SIGKILL" not in r.stderr, r.stderr


# ------------------------------------------------------------------ partitions

A_SCRIPT = """
echo $$ > {d}/a.pid
{trap}
echo "start $(date +%s.%N)" >> {d}/a.log
while :; do date +%s.%N >> {d}/a.beats; sleep 0.05; done
"""
TRAP_END = """trap 'echo "end $(date +%s.%N)" >> {d}/a.log; exit 0' TERM"""
TRAP_IGNORE = "trap '' TERM"
B_SCRIPT = """
if kill -0 "$(cat {d}/a.pid)" 2>/dev/null; then echo "A-ALIVE" >> {d}/b.log; fi
echo "start $(date +%s.%N)" >> {d}/b.log
sleep 0.5
echo "beats $(wc -l < {d}/a.beats)" >> {d}/b.log
"""


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode,cmd_traps,opts", [
    ("blackhole", True, ["--ttl", "3"]),  # the defaults: SIGTERM 1 s, SIGKILL 0.5 s before
    ("refuse", True, ["--ttl", "3"]),
    ("blackhole", False, ["--ttl", "4", "--term-before", "1.8", "--kill-before", "0.9"]),
    ("refuse", False, ["--ttl", "3", "--kill-after", "0.2"]),
])
def test_partition_longer_than_ttl_no_overlap(etcd, proxy, tmp_path, mode, cmd_traps, opts):
    """A holds through the proxy; B waits straight on etcd; the proxy is cut
    for good.  A's coord-lock ends CMD's whole tree (SIGTERM, then SIGKILL
    if needed) before its lease can run out and exits 75; B's CMD starts
    only after: A's CMD is dead, its end and last heartbeat come before B's
    start, and no heartbeat follows.  (Checked: with no watchdog the overlap
    checks fail; killing only when libcoord reports the lease lost, at its
    local expiry, still usually beats etcd's revocation, so the margin that
    A reports from its deadline is checked too, and the TERM trap's run.)"""
    d = str(tmp_path)
    trap = (TRAP_END if cmd_traps else TRAP_IGNORE).format(d=d)
    a = start_cl(proxy.endpoint, "-v", *opts, "part", "--", *sh(A_SCRIPT.format(d=d, trap=trap)))
    wait_for(lambda: "start" in read(d + "/a.log") or a.poll() is not None, 30, what="A's CMD to start")
    assert a.poll() is None, finish_prog(a, check=False)
    b = start_cl(etcd, "-v", "part", "--", *sh(B_SCRIPT.format(d=d)))
    wait_keys(etcd, "part", 2)
    time.sleep(0.5)
    assert read(d + "/b.log") == ""
    cut_at = time.time()
    proxy.cut(mode)
    try:
        finish_prog(b, timeout=90)
        # the overlap checks first: they are the point (A is ended below)
        blog = read(d + "/b.log")
        assert "A-ALIVE" not in blog, "B's CMD ran while A's CMD still ran:\n%s" % blog
        b_start = float(re.search(r"start (\S+)", blog).group(1))
        beats = [float(x) for x in read(d + "/a.beats").split()]
        assert beats and max(beats) < b_start, "A's CMD beat at %.3f, after B's started at %.3f" % (
            max(beats), b_start)
        n_beats = int(re.search(r"beats\s+(\d+)", blog).group(1))
        assert n_beats == len(beats), "A's CMD went on beating while B's CMD ran"
    finally:
        if a.poll() is None and b.poll() is not None and "A-ALIVE" in read(d + "/b.log"):
            end_process(a, signal.SIGKILL)
    _, a_err = finish_prog(a, timeout=90, expect_rc=75)
    assert not alive(int(read(d + "/a.pid")))
    alog = read(d + "/a.log")
    if cmd_traps:
        m = re.search(r"end (\S+)", alog)
        assert m, "A's CMD got no SIGTERM (its trap never ran):\n%s" % a_err
        a_end = float(m.group(1))
        assert a_end < b_start, "A's CMD ended at %.3f, B's started at %.3f" % (a_end, b_start)
        assert "sending SIGTERM" in a_err, a_err
    else:
        assert "end" not in alog
        assert "sending SIGKILL" in a_err, a_err
    assert "lease renewals failing" in a_err, a_err
    assert re.search(r"gone \(.*\), [0-9.]+ s before lock part could be lost", a_err), a_err
    assert b_start > cut_at
