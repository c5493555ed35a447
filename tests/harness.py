"""harness.py — real servers for coord's end-to-end tests.

Everything here talks to real programs: /usr/bin/etcd started on free
loopback ports in a temporary directory, etcdctl, openssl for TLS material,
the project's own C programs and coordfs.  No mocks.

Main pieces (the fixtures in conftest.py are thin wrappers around them):

  EtcdCluster(size=1, tls=False, ...)   one or more etcd members
      .start() / .close()
      .endpoints            "127.0.0.1:p1,127.0.0.1:p2,..."  (running members)
      .all_endpoints        the same for every member, running or not
      .members              [EtcdMember]; m.pid, m.endpoint, m.kill(), ...
      .etcdctl(*args)       ETCDCTL_API=3, returns stdout, raises EtcdctlError
      .leader(), .followers(), .status(m), .revision(), .compact(rev)
      .kill(m) / .stop(m) / .pause(m) / .resume(m) / .restart(m)
      .enable_auth(), .add_user(name, pw, prefix)
      .env()                environment for a C program (COORD_ENDPOINTS ...)
  Certs(dir)                CA, server and client certificates (openssl)
  build_path(name)          $COORD_BUILD/<name>
  run_prog(prog, *args, endpoints=...)   run a C test program, return stdout
  start_prog(...)           the same in the background (Popen)
  CoordfsMount              a running `coordfs -f` and its mount point

Processes are only ever signalled by the PID that this module started.
"""

import atexit
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETCD = os.environ.get("COORD_ETCD", "/usr/bin/etcd")
ETCDCTL = os.environ.get("COORD_ETCDCTL", "/usr/bin/etcdctl")
FUSERMOUNT = shutil.which("fusermount3") or "/usr/bin/fusermount3"

SANITIZE = os.environ.get("SANITIZE", "") == "1"
ASAN_OPTIONS = "detect_leaks=1:abort_on_error=0"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"
# Words that mean a sanitizer found something, whatever the exit code.
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "ERROR: ThreadSanitizer", "WARNING: ThreadSanitizer")

_live = set()  # every started process still possibly running (for atexit)


class HarnessError(RuntimeError):
    pass


class EtcdctlError(HarnessError):
    def __init__(self, args, returncode, stdout, stderr):
        self.args_ = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        err = [l for l in (stderr or "").splitlines() if l.startswith("Error:")]
        msg = "\n".join(err) if err else (stderr or stdout or "").strip()
        super().__init__("etcdctl %s failed (exit %s): %s" % (" ".join(args), returncode, msg))


class ProgError(HarnessError):
    def __init__(self, argv, returncode, stdout, stderr, why):
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__("%s: %s\n--- stdout ---\n%s\n--- stderr ---\n%s" % (
            " ".join(argv), why, _tail_text(stdout, 60), _tail_text(stderr, 80)))


# ------------------------------------------------------------------ utilities

def _tail_text(text, n):
    lines = (text or "").splitlines()
    return "\n".join(lines[-n:])


def tail(path, n=40):
    """Last n lines of a file ("" if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return _tail_text(data, n)


def wait_for(pred, timeout, interval=0.02, what="condition"):
    """Poll pred() until it returns a true value (returned) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


_given_ports = set()


def _port_range():
    """Ports to hand out: below the kernel's ephemeral range, so that no
    outgoing connection (whose source port comes from that range) can take a
    port between free_port() and the server's bind, or while a killed member
    is down before its restart on the same port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low > 12000:
        return 10000, low - 1
    return None  # an odd set-up: let the kernel choose


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now and that this
    process has not handed out before."""
    import random
    rng = _port_range()
    for _ in range(500):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", random.randint(*rng) if rng else 0))
            port = s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    raise HarnessError("no free port")


def tmp_base():
    """Where etcd data directories go: $COORD_TEST_TMP, else /dev/shm (tmpfs:
    fsync is free, so etcd starts in ~0.25 s instead of ~1 s), else /tmp."""
    d = os.environ.get("COORD_TEST_TMP")
    if d:
        os.makedirs(d, exist_ok=True)
        return d
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def signal_pid(proc, sig):
    """Signal a process we started, by its PID, if it still runs."""
    if proc is not None and proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def end_process(proc, sig=signal.SIGTERM, timeout=10.0):
    """Stop a process we started: sig, wait up to timeout, then SIGKILL.
    Returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        signal_pid(proc, signal.SIGCONT)  # a stopped process cannot die of SIGTERM
        signal_pid(proc, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_pid(proc, signal.SIGKILL)
            proc.wait(10)
    _live.discard(proc)
    return proc.returncode


@atexit.register
def _reap_all():
    for p in list(_live):
        try:
            end_process(p, signal.SIGKILL, 5)
        except Exception:
            pass


def _popen(argv, **kw):
    p = subprocess.Popen(argv, **kw)
    _live.add(p)
    return p


# ------------------------------------------------------------------ TLS

class Certs:
    """A throw-away PKI made with openssl in `directory`:
    ca (ca.crt/ca.key), server (SAN 127.0.0.1, localhost) and a client
    certificate whose CN is `client_cn` (etcd maps a client certificate's CN
    to a user when auth is on).  More clients: certs.client("alice")."""

    def __init__(self, directory, client_cn="root"):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.ca = os.path.join(directory, "ca.crt")
        self.ca_key = os.path.join(directory, "ca.key")
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", self.ca_key, "-out", self.ca, "-days", "3650",
                      "-subj", "/CN=coord-test-ca",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.server_cert, self.server_key = self._issue(
            "server", "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n")
        self.client_cert, self.client_key = self.client(client_cn)

    def client(self, cn):
        """(cert, key) paths of a client certificate with this CN."""
        return self._issue("client-" + cn, cn,
                           "extendedKeyUsage=clientAuth\n"
                           "keyUsage=critical,digitalSignature,keyEncipherment\n")

    def _issue(self, name, cn, ext):
        key = os.path.join(self.dir, name + ".key")
        csr = os.path.join(self.dir, name + ".csr")
        crt = os.path.join(self.dir, name + ".crt")
        extf = os.path.join(self.dir, name + ".ext")
        with open(extf, "w") as f:
            f.write(ext)
        self._openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + cn)
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                      "-CAcreateserial", "-out", crt, "-days", "3650", "-extfile", extf)
        return crt, key

    def _openssl(self, *args):
        r = subprocess.run(["openssl"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True, timeout=60)
        if r.returncode != 0:
            raise HarnessError("openssl %s failed: %s" % (" ".join(args), r.stderr.strip()))

    def ssl_context(self, client=True):
        """An ssl.SSLContext trusting the CA (and presenting the client cert)."""
        ctx = ssl.create_default_context(cafile=self.ca)
        if client:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


# ------------------------------------------------------------------ etcd

class EtcdMember:
    """One etcd process.  Its data directory survives stop/kill/restart."""

    def __init__(self, cluster, index):
        self.cluster = cluster
        self.index = index
        self.name = "m%d" % index
        self.dir = os.path.join(cluster.dir, self.name)
        self.data_dir = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.proc = None
        self.paused = False
        self.started_once = False
        self.new_ports()

    def new_ports(self):
        self.client_port = free_port()
        self.peer_port = free_port()

    # addresses
    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.client_port

    @property
    def client_url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.cluster.tls else "http", self.client_port)

    @property
    def peer_url(self):
        return "http://127.0.0.1:%d" % self.peer_port

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def running(self):
        """The process exists (it may be paused)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def serving(self):
        """Running and not paused."""
        return self.running and not self.paused

    def __repr__(self):
        state = "paused" if self.paused and self.running else ("running" if self.running else "down")
        return "<etcd %s %s pid=%s %s>" % (self.name, self.endpoint, self.pid, state)

    # lifecycle
    def argv(self):
        c = self.cluster
        a = [ETCD,
             "--name", self.name,
             "--data-dir", self.data_dir,
             "--listen-client-urls", self.client_url,
             "--advertise-client-urls", self.client_url,
             "--listen-peer-urls", self.peer_url,
             "--initial-advertise-peer-urls", self.peer_url,
             "--initial-cluster", c.initial_cluster(),
             "--initial-cluster-token", c.token,
             "--initial-cluster-state", "existing" if self.started_once else "new",
             "--heartbeat-interval", str(c.heartbeat_ms),
             "--election-timeout", str(c.election_ms),
             "--bcrypt-cost", "4",  # auth: each Authenticate costs ms, not 100 ms
             "--logger", "zap", "--log-outputs", "stderr", "--log-level", c.log_level]
        if c.tls:
            a += ["--cert-file", c.certs.server_cert, "--key-file", c.certs.server_key,
                  "--trusted-ca-file", c.certs.ca]
            if c.client_cert_auth:
                a += ["--client-cert-auth"]
        a += list(c.extra_args)
        return a

    def start(self):
        if self.running:
            raise HarnessError("%r already running" % self)
        os.makedirs(self.dir, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(("\n==== harness: starting %s at %s ====\n" % (self.name, time.strftime("%H:%M:%S")))
                  .encode())
        log.flush()
        try:
            self.proc = _popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=_etcd_env())
        finally:
            log.close()
        with open(os.path.join(self.dir, "pid"), "w") as f:
            f.write("%d\n" % self.proc.pid)  # for sweep_stale()
        self.paused = False
        self.started_once = True

    def signal(self, sig):
        signal_pid(self.proc, sig)

    def kill(self):
        """kill -9, and reap it."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
            _live.discard(self.proc)
        self.paused = False

    def stop(self, timeout=10.0):
        """SIGTERM (graceful), SIGKILL after timeout."""
        end_process(self.proc, signal.SIGTERM, timeout)
        self.paused = False

    def pause(self):
        """SIGSTOP: the process stays, but answers nothing (a long GC pause)."""
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        """SIGCONT."""
        self.signal(signal.SIGCONT)
        self.paused = False

    def restart(self, wait=True, timeout=20.0):
        """Stop (if running) and start again with the same data and ports."""
        if self.running:
            self.stop()
        self.start()
        if wait:
            self.cluster.wait_healthy([self], timeout)

    def wipe(self):
        """Delete the data directory (member must be down)."""
        if self.running:
            raise HarnessError("wipe of running %r" % self)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # probes
    def health(self, timeout=1.0):
        """True if /health says the member has a leader and serves (HTTP, fast)."""
        if not self.serving:
            return False
        ctx = None
        if self.cluster.tls:
            ctx = self.cluster.certs.ssl_context(client=True)
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=timeout, context=ctx) as r:
                body = json.loads(r.read().decode() or "{}")
                return body.get("health") in ("true", True)
        except (OSError, ValueError, urllib.error.URLError, ssl.SSLError):
            return False

    def log_tail(self, n=40):
        return tail(self.log_path, n)


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def sweep_stale(base=None):
    """Remove what a test run that died (kill -9, a machine reset) left in
    the etcd temporary directory: coord-* directories whose owning test
    process is gone.  An etcd still running from such a directory is killed
    by the PID recorded there, after checking that its command line names
    that very directory.  Directories of live test runs are left alone."""
    base = base or tmp_base()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        d = os.path.join(base, name)
        owner = os.path.join(d, "owner")
        if not name.startswith("coord-") or not os.path.isfile(owner):
            continue
        try:
            with open(owner) as f:
                pid = int(f.read().strip() or "0")
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        for m in os.listdir(d):
            pf = os.path.join(d, m, "pid")
            try:
                with open(pf) as f:
                    mpid = int(f.read().strip())
                with open("/proc/%d/cmdline" % mpid, "rb") as f:
                    cmd = f.read().decode("utf-8", "replace")
            except (OSError, ValueError):
                continue
            if os.path.join(d, m, "data") in cmd.split("\0"):
                try:
                    os.kill(mpid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(d, ignore_errors=True)


def _etcd_env():
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("ETCD_") or k.startswith("ETCDCTL_"):
            del env[k]  # no stray configuration from the caller's environment
    return env


class EtcdCluster:
    """`size` etcd members on 127.0.0.1 in a fresh temporary directory.

    tls: serve clients over TLS with certificates from `certs` (made if
    None); client_cert_auth (default: same as tls) requires a client
    certificate.  extra_args go to every member (e.g. "--max-request-bytes",
    "4096"; a flag given twice takes the last value).  Peers always talk
    plain HTTP."""

    def __init__(self, size=1, tls=False, client_cert_auth=None, certs=None, extra_args=(),
                 heartbeat_ms=None, election_ms=None, log_level="info", name="etcd", base_dir=None):
        self.size = size
        self.tls = tls
        self.client_cert_auth = tls if client_cert_auth is None else client_cert_auth
        self.extra_args = tuple(extra_args)
        # A single member holds no election after its first, so it gets short
        # raft timers: elected in ~0.1 s instead of up to 1 s (its minimum
        # lease TTL, 1.5 x election timeout, becomes 1 s).  Clusters keep
        # etcd's defaults so that a loaded 2-core machine sees no spurious
        # elections.
        self.heartbeat_ms = heartbeat_ms or (20 if size == 1 else 100)
        self.election_ms = election_ms or (200 if size == 1 else 1000)
        self.log_level = log_level
        self.dir = tempfile.mkdtemp(prefix="coord-%s-" % name, dir=base_dir or tmp_base())
        self.token = os.path.basename(self.dir)
        with open(os.path.join(self.dir, "owner"), "w") as f:
            f.write("%d\n" % os.getpid())  # for sweep_stale()
        self.certs = certs
        if tls and certs is None:
            self.certs = Certs(os.path.join(self.dir, "pki"))
        self.root_password = None  # set by enable_auth
        self.users = {}  # name -> password (added by add_user)
        self.members = [EtcdMember(self, i) for i in range(size)]
        self.closed = False

    def __repr__(self):
        return "<EtcdCluster %s %r>" % (self.dir, self.members)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def initial_cluster(self):
        return ",".join("%s=%s" % (m.name, m.peer_url) for m in self.members)

    # ---------------------------------------------------------- lifecycle
    def start(self, timeout=30.0):
        """Start every member, wait until all are healthy.  Retries with new
        ports if one was taken meanwhile.  Raises with the logs on failure."""
        last = None
        for attempt in range(3):
            for m in self.members:
                m.start()
            try:
                self.wait_healthy(self.members, timeout)
                return self
            except HarnessError as e:
                last = e
                logs = "".join(m.log_tail(200) for m in self.members)
                for m in self.members:
                    m.kill()
                if "address already in use" not in logs:
                    break
                for m in self.members:  # port race: start over with new ports and data
                    m.new_ports()
                    m.started_once = False
                    shutil.rmtree(m.dir, ignore_errors=True)
        self.close()
        raise last

    def wait_healthy(self, members=None, timeout=20.0):
        """Wait until each of members (default: all running) reports healthy."""
        members = [m for m in (members or self.members) if m.running]
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            for m in list(pending):
                if not m.running:
                    raise HarnessError("etcd %s (pid %s) exited with %s while starting; log tail:\n%s"
                                       % (m.name, m.pid, m.proc.returncode, m.log_tail()))
                if m.health(timeout=0.5):
                    pending.remove(m)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise HarnessError("etcd not healthy after %.0fs: %s\n%s" % (
                    timeout, pending, "\n".join("--- %s log tail:\n%s" % (m.name, m.log_tail())
                                                for m in pending)))
            time.sleep(0.03)
        return self

    def close(self):
        """Stop every member (by PID) and delete the directory (kept if
        COORD_KEEP_TMP=1)."""
        if self.closed:
            return
        self.closed = True
        for m in self.members:
            try:
                m.stop(timeout=5)
            except Exception:
                m.kill()
        if os.environ.get("COORD_KEEP_TMP") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)

    stop_all = close

    # ---------------------------------------------------------- members
    def member(self, m):
        """A member from an EtcdMember, an index or a name."""
        if isinstance(m, EtcdMember):
            return m
        if isinstance(m, int):
            return self.members[m]
        for x in self.members:
            if x.name == m or x.endpoint == m:
                return x
        raise KeyError(m)

    def kill(self, m):
        self.member(m).kill()

    def stop(self, m):
        self.member(m).stop()

    def pause(self, m):
        self.member(m).pause()

    def resume(self, m):
        self.member(m).resume()

    def restart(self, m, wait=True, timeout=20.0):
        self.member(m).restart(wait=wait, timeout=timeout)

    def start_member(self, m, wait=True, timeout=20.0):
        m = self.member(m)
        m.start()
        if wait:
            self.wait_healthy([m], timeout)

    # ---------------------------------------------------------- addresses
    @property
    def endpoints(self):
        """Comma-separated host:port of running (not paused) members; all
        members if none runs."""
        ms = [m for m in self.members if m.serving] or self.members
        return ",".join(m.endpoint for m in ms)

    @property
    def all_endpoints(self):
        return ",".join(m.endpoint for m in self.members)

    @property
    def urls(self):
        """Comma-separated client URLs (http:// or https://) of every member."""
        return ",".join(m.client_url for m in self.members)

    @property
    def endpoint(self):
        """The first member's host:port."""
        return self.members[0].endpoint

    # ---------------------------------------------------------- etcdctl
    def etcdctl_argv(self, endpoints=None, user=None):
        a = [ETCDCTL, "--endpoints", endpoints or self.endpoints, "--dial-timeout", "2s",
             "--command-timeout", "10s"]
        if self.tls:
            a += ["--cacert", self.certs.ca, "--cert", self.certs.client_cert, "--key",
                  self.certs.client_key]
        if user is None and self.root_password is not None:
            user = "root:" + self.root_password
        if user:
            a += ["--user", user]
        return a

    def etcdctl(self, *args, endpoints=None, user=None, input=None, check=True, timeout=30.0):
        """Run `etcdctl ARGS` (API 3) against the running members (or
        `endpoints`), as root once auth is on (or as user "name:password").
        Returns stdout; raises EtcdctlError on a non-zero exit if check."""
        argv = self.etcdctl_argv(endpoints, user) + [str(a) for a in args]
        env = _etcd_env()
        env["ETCDCTL_API"] = "3"
        r = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=None if input is not None else subprocess.DEVNULL,
                           text=True, timeout=timeout, env=env)
        if check and r.returncode != 0:
            raise EtcdctlError([str(a) for a in args], r.returncode, r.stdout, r.stderr)
        return r.stdout

    def etcdctl_json(self, *args, **kw):
        return json.loads(self.etcdctl("-w", "json", *args, **kw))

    def put(self, key, value, *opts, **kw):
        """etcdctl put; opts such as "--lease=1234abcd".  Values of any length
        (large ones go through stdin) and values starting with '-' work."""
        value = str(value)
        if len(value) > 65536:
            self.etcdctl("put", *opts, "--", key, input=value, **kw)
        else:
            self.etcdctl("put", *opts, "--", key, value, **kw)

    def get(self, key, raw=False, **kw):
        """Value of key (str, or bytes if raw) or None."""
        r = self.etcdctl_json("get", "--", key, **kw)
        kvs = r.get("kvs") or []
        if not kvs:
            return None
        v = base64.b64decode(kvs[0].get("value", ""))
        return v if raw else v.decode("utf-8", "replace")

    def get_prefix(self, prefix, **kw):
        """{key: value} (str) of every key under prefix."""
        r = self.etcdctl_json("get", "--prefix", prefix, **kw)
        return {base64.b64decode(kv["key"]).decode("utf-8", "replace"):
                base64.b64decode(kv.get("value", "")).decode("utf-8", "replace")
                for kv in r.get("kvs") or []}

    # ---------------------------------------------------------- cluster state
    def status(self, m=None, timeout=5.0):
        """etcdctl endpoint status of one member (default: first serving) as a
        dict: header{cluster_id, member_id, revision, raft_term}, leader,
        version, dbSize, raftIndex ..."""
        m = self.member(m) if m is not None else next(x for x in self.members if x.serving)
        out = self.etcdctl_json("endpoint", "status", endpoints=m.endpoint, timeout=timeout)
        return out[0]["Status"]

    def member_id(self, m):
        return self.status(m)["header"]["member_id"]

    def leader(self, timeout=15.0):
        """The member that is leader now, as seen by the serving members;
        waits (up to timeout) for an election to settle."""
        def find():
            ids = {}
            claimed = set()
            for m in self.members:
                if not m.serving:
                    continue
                try:
                    st = self.status(m, timeout=3)
                except (HarnessError, subprocess.TimeoutExpired, ValueError, KeyError):
                    continue
                ids[st["header"]["member_id"]] = m
                if st.get("leader"):
                    claimed.add(st["leader"])
            for lid in claimed:
                if lid in ids and len(claimed) == 1:
                    return ids[lid]
            return None
        return wait_for(find, timeout, 0.1, "an etcd leader")

    def followers(self, timeout=15.0):
        ld = self.leader(timeout)
        return [m for m in self.members if m is not ld and m.serving]

    def revision(self):
        """The current store revision."""
        return int(self.etcdctl_json("get", "/", "--limit", "1")["header"]["revision"])

    def compact(self, rev=None, physical=True):
        """Compact up to rev (default: the current revision). Returns rev."""
        rev = rev or self.revision()
        args = ["compact", str(rev)]
        if physical:
            args.append("--physical")
        self.etcdctl(*args)
        return rev

    def lease_grant(self, ttl_s):
        """Grant a lease with etcdctl; returns its id (int)."""
        out = self.etcdctl("lease", "grant", str(ttl_s))
        # "lease 694d7b1f3f5cbd0a granted with TTL(10s)"
        return int(out.split()[1], 16)

    # ---------------------------------------------------------- auth
    def enable_auth(self, root_password="rootpw"):
        """Create user root (role root) and turn auth on.  Afterwards etcdctl()
        runs as root automatically."""
        self.etcdctl("user", "add", "root", "--new-user-password", root_password, "--interactive=false")
        self.etcdctl("user", "grant-role", "root", "root", check=False)  # 3.4 grants it on enable
        self.etcdctl("auth", "enable")
        self.root_password = root_password
        return root_password

    def disable_auth(self):
        self.etcdctl("auth", "disable")
        self.root_password = None

    def add_user(self, name, password, prefix=None, readonly=False, role=None):
        """User `name` with a role of the same name (or `role`) that may read
        (and, unless readonly, write) every key starting with `prefix`
        (None: no permission at all).  Works with auth on or off."""
        role = role or name
        self.etcdctl("role", "add", role)
        if prefix is not None:
            self.grant(role, prefix, readonly=readonly)
        self.etcdctl("user", "add", name, "--new-user-password", password, "--interactive=false")
        self.etcdctl("user", "grant-role", name, role)
        self.users[name] = password
        return name, password

    def grant(self, role, prefix, readonly=False):
        """Give role read (or readwrite) permission on every key under prefix."""
        self.etcdctl("role", "grant-permission", role, "read" if readonly else "readwrite",
                     "--prefix=true", prefix)

    # ---------------------------------------------------------- for C programs
    def env(self, base=None):
        """Environment for a program under test: COORD_ENDPOINTS and the
        sanitizer options."""
        env = prog_env(base)
        env["COORD_ENDPOINTS"] = self.endpoints
        return env

    def coordfs_args(self):
        """coordfs options for this cluster's TLS (empty when plain)."""
        if not self.tls:
            return []
        return ["--cacert", self.certs.ca, "--cert", self.certs.client_cert, "--key", self.certs.client_key]

    def log_tails(self, n=30):
        return "\n".join("--- etcd %s (%s) log tail:\n%s" % (m.name, m.endpoint, m.log_tail(n))
                         for m in self.members)


# ------------------------------------------------------------------ C programs

def build_dir():
    """$COORD_BUILD (set by the Makefile: .../build or .../build-san), else
    build-san when SANITIZE=1, else build, in the checkout."""
    d = os.environ.get("COORD_BUILD")
    if d:
        return d
    return os.path.join(REPO, "build-san" if SANITIZE else "build")


def build_path(name):
    """Path of a built artefact: build_path("tests/lock_basic"),
    build_path("coordfs"), build_path("examples/config").  A bare name with
    no '/' that is not at the top of the build dir is looked up in tests/."""
    d = build_dir()
    p = os.path.join(d, name)
    if "/" not in name and not os.path.exists(p) and os.path.exists(os.path.join(d, "tests", name)):
        p = os.path.join(d, "tests", name)
    return p


def _is_prog(p):
    return os.path.isfile(p) and os.access(p, os.X_OK)


def have_build(name):
    return _is_prog(build_path(name))


def require_build(name):
    """build_path(name), or skip the calling test if it was not built."""
    import pytest
    p = build_path(name)
    if not _is_prog(p):
        pytest.skip("%s not built (run make)" % p)
    return p


def prog_env(base=None, endpoints=None):
    """os.environ (or base) plus COORD_ENDPOINTS and sanitizer options."""
    env = dict(os.environ if base is None else base)
    if endpoints is not None:
        env["COORD_ENDPOINTS"] = endpoints
    if SANITIZE:
        env.setdefault("ASAN_OPTIONS", ASAN_OPTIONS)
        env.setdefault("UBSAN_OPTIONS", UBSAN_OPTIONS)
        env.setdefault("LSAN_OPTIONS", "suppressions=" + os.path.join(REPO, "tests", "lsan.supp"))
    return env


def sanitizer_report(text):
    """The first sanitizer finding in text (with some context), or None."""
    if not text:
        return None
    for mark in SANITIZER_MARKS:
        i = text.find(mark)
        if i >= 0:
            return text[max(0, text.rfind("\n", 0, max(0, i - 200))):i + 3000]
    return None


def _prog_argv(prog, args):
    path = prog if os.path.isabs(prog) else build_path(prog)
    if not _is_prog(path):
        raise ProgError([path], None, "", "", "not built (run make, or set COORD_BUILD)")
    return [path] + [str(a) for a in args]


def _endpoints_of(endpoints):
    if endpoints is None or isinstance(endpoints, str):
        return endpoints
    return endpoints.endpoints  # an EtcdCluster


def run_prog(prog, *args, endpoints=None, env=None, input=None, timeout=120.0, check=True,
             expect_rc=0, result=False):
    """Run a C program (name relative to the build dir, or an absolute path)
    with COORD_ENDPOINTS=endpoints (a string or an EtcdCluster).  Returns its
    stdout (or the CompletedProcess if result=True).  Raises ProgError if
    check and the exit code is not expect_rc, and always if a sanitizer
    reported anything on stderr."""
    argv = _prog_argv(prog, args)
    e = prog_env(env, _endpoints_of(endpoints))
    try:
        r = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=None if input is not None else subprocess.DEVNULL,
                           text=True, errors="replace", timeout=timeout, env=e)
    except subprocess.TimeoutExpired as t:
        raise ProgError(argv, None, _s(t.stdout), _s(t.stderr), "timed out after %ss" % timeout)
    rep = sanitizer_report(r.stderr)
    if rep:
        raise ProgError(argv, r.returncode, r.stdout, r.stderr, "sanitizer report:\n" + rep)
    if check and r.returncode != expect_rc:
        raise ProgError(argv, r.returncode, r.stdout, r.stderr,
                        "exit code %s, expected %s" % (r.returncode, expect_rc))
    return r if result else r.stdout


def _s(b):
    if b is None:
        return ""
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def start_prog(prog, *args, endpoints=None, env=None, stdin=subprocess.DEVNULL, **kw):
    """Start a C program in the background (stdout/stderr piped, text).
    Stop it with end_process(p) or p.wait(); check_prog(p) checks sanitizer
    output once it has ended."""
    argv = _prog_argv(prog, args)
    p = _popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
               errors="replace", env=prog_env(env, _endpoints_of(endpoints)), start_new_session=True,
               **kw)
    p.argv = argv
    return p


def finish_prog(p, timeout=60.0, expect_rc=0, check=True):
    """Wait for a start_prog process; returns (stdout, stderr); raises
    ProgError on a sanitizer report or (if check) an unexpected exit code."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process(p, signal.SIGKILL)
        out, err = p.communicate()
        raise ProgError(p.argv, None, out, err, "timed out after %ss" % timeout)
    _live.discard(p)
    rep = sanitizer_report(err)
    if rep:
        raise ProgError(p.argv, p.returncode, out, err, "sanitizer report:\n" + rep)
    if check and p.returncode != expect_rc:
        raise ProgError(p.argv, p.returncode, out, err, "exit code %s, expected %s" % (p.returncode, expect_rc))
    return out, err


# ------------------------------------------------------------------ coordfs

def _mountinfo():
    """The lines of /proc/self/mountinfo, split into fields ([] if unreadable)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return [line.split() for line in f]
    except OSError:
        return []


def _mounts_on(path):
    """[(mount id, parent id)] of the mounts on path, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    return [(f[0], f[1]) for f in _mountinfo() if len(f) > 4 and _unescape(f[4]) == path]


def mount_device(mount_id):
    """The minor device number of a mount (a FUSE connection's number in
    /sys/fs/fuse/connections), or None."""
    for f in _mountinfo():
        if len(f) > 2 and f[0] == mount_id and ":" in f[2]:
            return int(f[2].split(":")[1])
    return None


def abort_fuse_connection(minor):
    """Abort a FUSE connection through fusectl (mounted here if it is not):
    every request waiting on it fails, so a daemon stuck in a request to its
    own mount can exit.  Returns whether it was aborted."""
    ctl = "/sys/fs/fuse/connections"
    if minor is None:
        return False
    if not os.path.exists(os.path.join(ctl, str(minor))):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", ctl], capture_output=True)
    try:
        with open(os.path.join(ctl, str(minor), "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def mount_ids(path):
    """Mount IDs of the mounts on path (a stale, disconnected FUSE mount
    still counts)."""
    return {m for m, _ in _mounts_on(path)}


def top_mount_id(path):
    """ID of the mount that path resolves to now (the one stacked on top),
    or None: the one that is no other mount's parent on that path."""
    ms = _mounts_on(path)
    parents = {p for _, p in ms}
    tops = [m for m, _ in ms if m not in parents]
    return tops[-1] if tops else None


def mounted(path):
    """True if path is a mount point in /proc/self/mountinfo."""
    return bool(mount_ids(path))


def _unescape(s):
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def fusermount_u(path, lazy=False):
    argv = [FUSERMOUNT, "-u"] + (["-z"] if lazy else []) + [path]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)


class CoordfsMount:
    """`coordfs -f --endpoints E [args] MOUNTPOINT` running in the background.

    Attributes: path (the mount point), proc, pid, log_path (its stderr and
    stdout), endpoints, argv, mount_id, is_mounted.  unmount() is idempotent
    and touches only this coordfs's own mount; check() raises if coordfs
    printed a sanitizer report."""

    def __init__(self, mountpoint, endpoints, args=(), env=None, log_path=None, binary=None):
        self.path = os.path.realpath(mountpoint)
        os.makedirs(self.path, exist_ok=True)
        self.endpoints = endpoints
        self.binary = binary or build_path("coordfs")
        self.argv = [self.binary, "-f", "--endpoints", endpoints] + [str(a) for a in args] + [self.path]
        self.log_path = log_path or (self.path.rstrip("/") + ".log")
        self.env = prog_env(env, endpoints)
        self.proc = None
        self.returncode = None
        self.mount_id = None
        self.device = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self, timeout=None):
        if timeout is None:
            timeout = 60.0 if SANITIZE else 20.0
        before = mount_ids(self.path)  # e.g. the dead mount of a coordfs killed with -9
        log = open(self.log_path, "ab")
        try:
            self.proc = _popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=self.env, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not (mount_ids(self.path) - before):
            if self.proc.poll() is not None:
                raise HarnessError("coordfs exited with %s before mounting %s:\n%s" % (
                    self.proc.returncode, self.path, tail(self.log_path, 60)))
            if time.monotonic() > deadline:
                self.unmount()
                raise HarnessError("coordfs did not mount %s within %.0fs:\n%s" % (
                    self.path, timeout, tail(self.log_path, 60)))
            time.sleep(0.02)
        self.mount_id = sorted(mount_ids(self.path) - before)[-1]
        self.device = mount_device(self.mount_id)
        return self

    @property
    def is_mounted(self):
        """This coordfs's own mount is still there (perhaps under another
        one mounted on the same path later)."""
        return self.mount_id is not None and self.mount_id in mount_ids(self.path)

    @property
    def on_top(self):
        """This coordfs's mount is the one the path shows (fusermount3 -u on
        the path would unmount it)."""
        return self.mount_id is not None and top_mount_id(self.path) == self.mount_id

    def join(self, *parts):
        return os.path.join(self.path, *parts)

    __truediv__ = join

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def unmount(self, timeout=20.0):
        """fusermount3 -u (lazy if busy), wait for coordfs to exit (SIGTERM,
        then SIGKILL by PID if it does not).  Returns its exit code."""
        if self.proc is None:
            return None
        # Only our own mount, and only while it is the one on top: a later
        # coordfs may be stacked on the same path (unmount that one first;
        # the fixture unmounts in reverse order of mounting).
        if self.on_top:
            r = fusermount_u(self.path)
            if r.returncode != 0 and self.on_top:
                fusermount_u(self.path, lazy=True)
        aborted = False
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                end_process(self.proc, signal.SIGTERM, 5)
            except subprocess.TimeoutExpired:
                # even SIGKILL cannot end a process one of whose threads
                # waits on its own mount: abort the connection, then fail
                aborted = abort_fuse_connection(self.device)
                self.proc.wait(10)
        _live.discard(self.proc)
        if self.on_top:  # coordfs died without unmounting
            fusermount_u(self.path, lazy=True)
        self.returncode = self.proc.returncode
        if aborted:
            raise HarnessError("coordfs %s had to be ended by aborting its FUSE connection:\n%s" %
                               (self.path, tail(self.log_path, 40)))
        return self.returncode

    def kill(self, sig=signal.SIGKILL):
        """Signal coordfs by PID (default kill -9); the mount stays until
        unmount() (reads then fail with ENOTCONN)."""
        signal_pid(self.proc, sig)

    def check(self):
        """Raise if coordfs printed a sanitizer report (call after unmount)."""
        rep = sanitizer_report(self.log())
        if rep:
            raise HarnessError("coordfs sanitizer report (%s):\n%s" % (self.log_path, rep))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.unmount()
