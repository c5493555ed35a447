"""test_security.py — coordfs under etcd auth and roles, TLS with client
certificates, and the mount's own permissions.

- auth: coordfs mounted as a user whose role may write only under
  /config/app/ reads and writes there, gets EACCES for every write
  elsewhere (config, locks); the password (from --password-file) never
  shows in any /proc/*/cmdline nor in coordfs's log; a wrong password makes
  coordfs exit non-zero with a clear message.
- TLS: coordfs with the right CA and client certificate works; with a CA
  that did not sign the server, or without a client certificate, it exits
  non-zero with a message (in the foreground and daemonized).
- mount permissions: without allow_other another uid gets EACCES (with
  allow_other it may read); with -o ro every write gets EROFS; files and
  directories carry the uid and gid given with -o uid=,gid= and the modes
  0644/0755 (0444/0555 read-only).
"""

import errno
import os
import stat
import subprocess
import tempfile

import pytest

import harness
from harness import Certs, CoordfsMount, wait_for

PASSWORD = "pw-Zq8v1-secret-do-not-leak"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def write(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    """Write data to path; returns 0 or the errno of the first failing step
    (open, write or close: coordfs commits at close)."""
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, data.encode())
    except OSError as e:
        os.close(fd)
        return e.errno
    try:
        os.close(fd)
    except OSError as e:
        return e.errno
    return 0


def err_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


@pytest.fixture
def open_dir():
    """A world-traversable directory for mount points (pytest's tmp_path is
    0700, which would give another uid EACCES for the wrong reason)."""
    d = tempfile.mkdtemp(prefix="coord-sec-")
    os.chmod(d, 0o755)
    yield d
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if harness.mounted(p):
            harness.fusermount_u(p, lazy=True)
    subprocess.run(["rm", "-rf", d])


# ------------------------------------------------------------------ auth

def auth_setup(etcd, tmp_path):
    etcd.put("/config/app/x", "1")
    etcd.put("/config/other", "2")
    etcd.enable_auth()
    # writes only under /config/app/; coordfs loads and watches the whole
    # trees, so the role also reads /config/, /services/ and /locks/
    etcd.add_user("alice", PASSWORD, prefix="/config/app/")
    for p in ("/config/", "/services/", "/locks/"):
        etcd.grant("alice", p, readonly=True)
    pf = tmp_path / "pw"
    pf.write_text(PASSWORD + "\n")
    os.chmod(pf, 0o600)
    return str(pf)


@pytest.mark.timeout(120)
def test_auth_user_limited_to_config_app(etcd, coordfs_mount, tmp_path):
    pf = auth_setup(etcd, tmp_path)
    m = coordfs_mount(etcd, "--user", "alice", "--password-file", pf)
    cfg = m.join("config")
    assert open(os.path.join(cfg, "app", "x")).read() == "1"
    assert write(os.path.join(cfg, "app", "y"), "new") == 0
    assert etcd.get("/config/app/y") == "new"
    assert write(os.path.join(cfg, "app", "x"), "changed") == 0
    assert etcd.get("/config/app/x") == "changed"
    assert err_of(os.unlink, os.path.join(cfg, "app", "y")) == 0
    assert etcd.get("/config/app/y") is None
    # elsewhere: EACCES for writes, nothing reaches etcd
    assert open(os.path.join(cfg, "other")).read() == "2"  # readable (role reads /config/)
    assert write(os.path.join(cfg, "other"), "mine") == errno.EACCES
    assert write(os.path.join(cfg, "newkey"), "mine") == errno.EACCES
    assert err_of(os.unlink, os.path.join(cfg, "other")) == errno.EACCES
    assert err_of(os.rename, os.path.join(cfg, "app", "x"), os.path.join(cfg, "moved")) == errno.EACCES
    assert etcd.get("/config/other") == "2"
    assert etcd.get("/config/newkey") is None and etcd.get("/config/moved") is None
    assert etcd.get("/config/app/x") == "changed"
    assert write(m.join("locks", "deploy"), "me", os.O_WRONLY) == errno.EACCES  # writing takes the lock
    assert etcd.get_prefix("/locks/") == {}
    # the password is nowhere to be seen
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        assert PASSWORD.encode() not in cmd, "password in cmdline of pid %s" % pid
    m.unmount()
    assert PASSWORD not in m.log()


@pytest.mark.timeout(120)
def test_auth_user_with_only_config_app_and_subtree(etcd, coordfs_mount, tmp_path):
    """A role that covers /config/app/ and nothing else: with --subtree app
    the mount loads and watches only that subtree; reads, writes and live
    changes work there, every write elsewhere gets EACCES."""
    etcd.put("/config/app/x", "1")
    etcd.put("/config/other", "2")
    etcd.enable_auth()
    etcd.add_user("bob", PASSWORD, prefix="/config/app/")  # no other grant
    pf = tmp_path / "pw"
    pf.write_text(PASSWORD + "\n")
    os.chmod(pf, 0o600)
    m = coordfs_mount(etcd, "--user", "bob", "--password-file", str(pf), "--subtree", "app")
    cfg = m.join("config")
    assert sorted(os.listdir(cfg)) == ["app"]  # /config/other is not this user's to see
    assert open(os.path.join(cfg, "app", "x")).read() == "1"
    assert write(os.path.join(cfg, "app", "y"), "new") == 0
    assert etcd.get("/config/app/y") == "new"
    etcd.put("/config/app/x", "from-elsewhere")  # as root: reaches the mount's watch
    wait_for(lambda: open(os.path.join(cfg, "app", "x")).read() == "from-elsewhere", 5,
             what="a change made elsewhere")
    assert write(os.path.join(cfg, "newkey"), "mine") == errno.EACCES
    assert err_of(os.rename, os.path.join(cfg, "app", "y"), os.path.join(cfg, "moved")) == errno.EACCES
    assert etcd.get("/config/newkey") is None and etcd.get("/config/moved") is None
    assert etcd.get("/config/other") == "2"
    m.unmount()
    assert PASSWORD not in m.log()


@pytest.mark.timeout(120)
def test_auth_wrong_password_fails_clearly(etcd, tmp_path, open_dir):
    auth_setup(etcd, tmp_path)
    bad = tmp_path / "bad"
    bad.write_text("not-the-password\n")
    mp = os.path.join(open_dir, "m")
    os.mkdir(mp)
    for fg in (["-f"], []):
        r = subprocess.run([harness.build_path("coordfs")] + fg +
                           ["--endpoints", etcd.endpoints, "--user", "alice", "--password-file", str(bad), mp],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode != 0, r
        assert "auth" in r.stderr.lower(), r.stderr
        assert "not-the-password" not in r.stderr + r.stdout
        assert not harness.mounted(mp)
    # no password file at all: a clear message too
    r = subprocess.run([harness.build_path("coordfs"), "-f", "--endpoints", etcd.endpoints, "--user", "alice",
                        "--password-file", str(tmp_path / "missing"), mp],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "password" in r.stderr, r


# ------------------------------------------------------------------ TLS

@pytest.mark.timeout(120)
def test_tls_right_certificates_work(etcd_tls, coordfs_mount):
    m = coordfs_mount(etcd_tls)  # adds --cacert/--cert/--key
    assert write(m.join("config", "tls"), "over tls") == 0
    assert etcd_tls.get("/config/tls") == "over tls"
    etcd_tls.put("/config/from-etcd", "v")
    wait_for(lambda: os.path.exists(m.join("config", "from-etcd")), 10, what="watched key over TLS")
    assert open(m.join("config", "from-etcd")).read() == "v"


@pytest.mark.timeout(180)
def test_tls_wrong_certificates_fail_clearly(etcd_tls, tls_certs, tmp_path, open_dir):
    c = tls_certs
    other = Certs(str(tmp_path / "other"), client_cn="root")
    mp = os.path.join(open_dir, "m")
    os.mkdir(mp)
    cases = {
        "wrong CA": ["--cacert", other.ca, "--cert", c.client_cert, "--key", c.client_key],
        "client cert of another CA": ["--cacert", c.ca, "--cert", other.client_cert, "--key", other.client_key],
        "no client cert": ["--cacert", c.ca],
        "missing file": ["--cacert", str(tmp_path / "nope.pem")],
    }
    for what, args in cases.items():
        for fg in (["-f"], []):
            argv = [harness.build_path("coordfs")] + fg + ["--endpoints", etcd_tls.endpoints,
                                                           "--timeout", "3s"] + args + [mp]
            r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            assert r.returncode != 0, (what, fg, r)
            assert "coordfs:" in r.stderr and ("etcd" in r.stderr or "TLS" in r.stderr
                                               or "nope.pem" in r.stderr), (what, fg, r.stderr)
            assert not harness.mounted(mp), what
            if harness.mounted(mp):
                harness.fusermount_u(mp, lazy=True)


# ------------------------------------------------------------------ mount permissions

def as_nobody(*cmd):
    return subprocess.run(NOBODY + list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(120)
def test_other_uid_gets_eacces_without_allow_other(etcd, coordfs_mount, open_dir):
    etcd.put("/config/app", "v")
    m = coordfs_mount(etcd, mountpoint=os.path.join(open_dir, "private"))
    assert open(m.join("config", "app")).read() == "v"
    for cmd in (["cat", m.join("config", "app")], ["ls", m.path], ["stat", m.join("config")]):
        r = as_nobody(*cmd)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r)
    r = as_nobody("sh", "-c", "echo x > %s" % m.join("config", "app"))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    assert etcd.get("/config/app") == "v"
    # the same with allow_other: the other uid reads (so the EACCES above
    # came from the mount option, not from the directories around it)
    m2 = coordfs_mount(etcd, "-o", "allow_other", mountpoint=os.path.join(open_dir, "shared"))
    r = as_nobody("cat", m2.join("config", "app"))
    assert r.returncode == 0 and r.stdout == "v", r


@pytest.mark.timeout(120)
def test_read_only_mount_every_write_erofs(etcd, coordfs_mount):
    etcd.put("/config/app/db", "x")
    etcd.put("/config/top", "t")
    m = coordfs_mount(etcd, "-o", "ro")
    cfg = m.join("config")
    assert open(os.path.join(cfg, "top")).read() == "t"
    checks = {
        "overwrite": lambda: write(os.path.join(cfg, "top"), "n"),
        "create": lambda: write(os.path.join(cfg, "new"), "n"),
        "append": lambda: write(os.path.join(cfg, "top"), "n", os.O_WRONLY | os.O_APPEND),
        "truncate": lambda: err_of(os.truncate, os.path.join(cfg, "top"), 0),
        "unlink": lambda: err_of(os.unlink, os.path.join(cfg, "top")),
        "rename": lambda: err_of(os.rename, os.path.join(cfg, "top"), os.path.join(cfg, "moved")),
        "mkdir": lambda: err_of(os.mkdir, os.path.join(cfg, "d")),
        "rmdir": lambda: err_of(os.rmdir, os.path.join(cfg, "app")),
        "setxattr": lambda: err_of(os.setxattr, os.path.join(cfg, "top"), "user.x", b"1"),
        "register": lambda: write(m.join("services", "chat", "c1"), '{"address":"10.0.0.1","port":80}'),
        "lock by open": lambda: err_of(os.open, m.join("locks", "deploy"), os.O_WRONLY),
        "chmod": lambda: err_of(os.chmod, os.path.join(cfg, "top"), 0o600),
    }
    got = {k: f() for k, f in checks.items()}
    bad = {k: (errno.errorcode.get(v, v) if v else "succeeded") for k, v in got.items() if v != errno.EROFS}
    assert not bad, "not EROFS: %s" % bad
    assert etcd.get_prefix("/config/") == {"/config/app/db": "x", "/config/top": "t"}
    assert etcd.get_prefix("/services/") == {} and etcd.get_prefix("/locks/") == {}
    st = os.stat(os.path.join(cfg, "top"))
    assert stat.S_IMODE(st.st_mode) & 0o222 == 0


@pytest.mark.timeout(120)
def test_uid_gid_and_modes(etcd, coordfs_mount):
    etcd.put("/config/app/db", "x")
    etcd.put("/config/top", "t")
    m = coordfs_mount(etcd, "-o", "uid=1234,gid=2345")
    paths = {"root": m.path, "config": m.join("config"), "dir": m.join("config", "app"),
             "file": m.join("config", "top"), "nested": m.join("config", "app", "db"),
             "status": m.join("status"), "locks": m.join("locks")}
    for what, p in paths.items():
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (1234, 2345), (what, st)
        if stat.S_ISDIR(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == 0o755, (what, oct(st.st_mode))
        else:
            assert stat.S_IMODE(st.st_mode) & 0o777 in (0o644, 0o444), (what, oct(st.st_mode))
    assert stat.S_IMODE(os.stat(paths["file"]).st_mode) == 0o644
    # a file this mount creates carries them too
    assert write(m.join("config", "made"), "1") == 0
    st = os.stat(m.join("config", "made"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o644)
    ro = coordfs_mount(etcd, "-o", "ro,uid=1234,gid=2345")
    assert stat.S_IMODE(os.stat(ro.join("config", "top")).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(ro.join("config", "app")).st_mode) == 0o555
