"""test_coordfs_options.py — starting, options and errors of coordfs.

Without etcd it exits non-zero with a clear message; an unusable mount point
likewise; it daemonizes (and still reports failures by its exit code);
-o forms of the options; --prefix; the password never in argv; SIGTERM
unmounts cleanly; fusermount3 -u ends it.
"""

import os
import signal
import subprocess
import time

import pytest

import harness
from harness import build_path, free_port, mounted, wait_for


def coordfs():
    return harness.require_build("coordfs")


def run(args, timeout=30, env=None):
    return subprocess.run([coordfs()] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=harness.prog_env(env))


def test_no_etcd_exits_nonzero_with_message(tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    port = free_port()
    t0 = time.monotonic()
    r = run(["-f", "--endpoints", "127.0.0.1:%d" % port, "--timeout", "2s", str(mp)])
    assert r.returncode != 0
    assert "cannot reach etcd at 127.0.0.1:%d" % port in r.stderr
    assert time.monotonic() - t0 < 20
    assert not mounted(str(mp))
    # daemonizing: the parent still reports the child's failure
    r = run(["--endpoints", "127.0.0.1:%d" % port, "--timeout", "2s", str(mp)])
    assert r.returncode != 0
    assert "cannot reach etcd" in r.stderr
    assert not mounted(str(mp))


def test_bad_mount_point(etcd, tmp_path):
    r = run(["-f", "--endpoints", etcd.endpoints, str(tmp_path / "missing")])
    assert r.returncode != 0 and "mount point" in r.stderr and "No such file" in r.stderr
    f = tmp_path / "file"
    f.write_text("x")
    r = run(["-f", "--endpoints", etcd.endpoints, str(f)])
    assert r.returncode != 0 and "not a directory" in r.stderr
    r = run([])
    assert r.returncode != 0 and "usage" in r.stderr


def test_daemon_mode_and_fusermount_u(etcd, tmp_path):
    mp = tmp_path / "d"
    mp.mkdir()
    r = run(["-o", "endpoints=%s" % etcd.endpoints, str(mp)])
    assert r.returncode == 0, r.stderr
    try:
        assert mounted(str(mp))
        etcd.put("/config/k", "v")
        wait_for(lambda: os.path.exists(mp / "config" / "k"), 5, what="k")
        assert (mp / "config" / "k").read_text() == "v"
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
    assert not mounted(str(mp))


def test_sigterm_unmounts_cleanly(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    assert mounted(m.path)
    os.kill(m.pid, signal.SIGTERM)
    m.proc.wait(10)
    assert m.proc.returncode == 0
    assert not mounted(m.path)


def test_sigint_unmounts_cleanly(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    os.kill(m.pid, signal.SIGINT)
    m.proc.wait(10)
    assert not mounted(m.path)


def test_fusermount_u_ends_coordfs(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    r = subprocess.run(["fusermount3", "-u", m.path])
    assert r.returncode == 0
    m.proc.wait(10)
    assert m.proc.returncode == 0


def test_prefix_option(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "-o", "prefix=/tenant1")
    with open(os.path.join(m.path, "config", "k"), "w") as f:
        f.write("v")
    assert etcd.get("/tenant1/config/k") == "v"
    assert etcd.get("/config/k") is None
    etcd.put("/config/other", "x")
    etcd.put("/tenant1/config/mine", "y")
    wait_for(lambda: os.path.exists(os.path.join(m.path, "config", "mine")), 5, what="mine")
    assert sorted(os.listdir(os.path.join(m.path, "config"))) == ["k", "mine"]


def test_password_file_not_in_argv(etcd, coordfs_mount, tmp_path):
    etcd.enable_auth("rootpw")
    pw = tmp_path / "pw"
    pw.write_text("rootpw\n")
    m = coordfs_mount(etcd, "--user", "root", "--password-file", str(pw))
    with open("/proc/%d/cmdline" % m.pid, "rb") as f:
        assert b"rootpw" not in f.read()
    with open(os.path.join(m.path, "config", "k"), "w") as f:
        f.write("v")
    assert etcd.get("/config/k", user="root:rootpw") == "v"


def test_password_from_environment(etcd, coordfs_mount):
    etcd.enable_auth("rootpw")
    m = coordfs_mount(etcd, "-o", "user=root", env=dict(os.environ, COORD_PASSWORD="rootpw"))
    with open(os.path.join(m.path, "config", "k2"), "w") as f:
        f.write("v")
    assert etcd.get("/config/k2", user="root:rootpw") == "v"


def test_wrong_password_fails(etcd, tmp_path):
    etcd.enable_auth("rootpw")
    mp = tmp_path / "m"
    mp.mkdir()
    r = run(["-f", "--endpoints", etcd.endpoints, "--user", "root", "--timeout", "2s", str(mp)],
            env=dict(os.environ, COORD_PASSWORD="wrong"))
    assert r.returncode != 0 and "etcd" in r.stderr
    assert not mounted(str(mp))


def test_tls_options(etcd_tls, coordfs_mount):
    m = coordfs_mount(etcd_tls)  # adds --cacert, --cert, --key
    with open(os.path.join(m.path, "config", "t"), "w") as f:
        f.write("tls")
    assert etcd_tls.get("/config/t") == "tls"


def test_tls_without_certificates_fails(etcd_tls, tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    r = run(["-f", "--endpoints", etcd_tls.endpoints, "--timeout", "2s", str(mp)])
    assert r.returncode != 0 and "etcd" in r.stderr
    assert not mounted(str(mp))


def test_permission_denied_is_eacces(etcd, coordfs_mount):
    etcd.put("/config/k", "v")
    etcd.enable_auth("rootpw")
    etcd.add_user("reader", "pw", prefix="/config/", readonly=True)
    m = coordfs_mount(etcd, "--user", "reader", env=dict(os.environ, COORD_PASSWORD="pw"))
    with open(os.path.join(m.path, "config", "k")) as f:
        assert f.read() == "v"
    with pytest.raises(OSError) as e:
        with open(os.path.join(m.path, "config", "k"), "w") as f:
            f.write("mine")
    assert e.value.errno == 13  # EACCES
    assert etcd.get("/config/k") == "v"
    assert os.listdir(os.path.join(m.path, "services")) == []
    etcd.put("/config/k", "v2")
    wait_for(lambda: open(os.path.join(m.path, "config", "k")).read() == "v2", 5, what="reader sees changes")


# ---------------------------------------------------------------- issue 13: unknown options, a second mount

@pytest.mark.parametrize("argv,named,hint", [
    (["--endpoint=127.0.0.1:2379"], "unknown option '--endpoint=127.0.0.1:2379'",
     "did you mean '--endpoints=127.0.0.1:2379'?"),
    (["--bogus"], "unknown option '--bogus'", None),
    (["-o", "bogus=1"], "unknown option '-o bogus=1'", None),
    (["-o", "ro,bogus=1,allow_other"], "unknown option '-o bogus=1'", None),
    (["-o", "service_tll=3"], "unknown option '-o service_tll=3'", "did you mean '-o service-ttl=3'?"),
    (["--local-name=*.tmp"], "unknown option '--local-name=*.tmp'", "did you mean '--local-names=*.tmp'?"),
])
def test_unknown_option_is_named(tmp_path, argv, named, hint):
    """Refused at once (before etcd is asked: the endpoint here answers
    nothing), exit 2, the option named, no usage text around it."""
    mp = tmp_path / "m"
    mp.mkdir()
    for fg in (["-f"], []):
        t0 = time.monotonic()
        r = run(fg + ["--endpoints", "127.0.0.1:%d" % free_port(), "--timeout", "5s"] + argv + [str(mp)])
        assert r.returncode == 2, r
        assert "coordfs: " + named in r.stderr, r.stderr
        if hint:
            assert hint in r.stderr, r.stderr
        assert "usage" not in r.stderr and "etcd" not in r.stderr, r.stderr
        assert time.monotonic() - t0 < 3
        assert not mounted(str(mp))


def test_fuse_and_fstab_options_still_accepted(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "-o", "nosuid,nodev,noatime,default_permissions,umask=027,_netdev,nofail,rw",
                      "-o", "fsname=coordfs", "-o", "uid=%d,gid=%d" % (os.getuid(), os.getgid()))
    with open(os.path.join(m.path, "config", "k"), "w") as f:
        f.write("v")
    assert etcd.get("/config/k") == "v"
    assert oct(os.stat(os.path.join(m.path, "config", "k")).st_mode & 0o777) == oct(0o640)
    fields = [l.split() for l in open("/proc/self/mountinfo") if l.split()[4] == m.path][0]
    assert "nosuid" in fields[5] and "nodev" in fields[5]


def test_read_only_option_still_accepted(etcd, coordfs_mount):
    etcd.put("/config/k", "v")
    m = coordfs_mount(etcd, "-o", "ro,allow_other")
    assert open(os.path.join(m.path, "config", "k")).read() == "v"
    with pytest.raises(OSError) as e:
        open(os.path.join(m.path, "config", "k"), "w")
    assert e.value.errno == 30  # EROFS


def test_second_coordfs_on_the_same_mount_point_is_refused(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    before = harness.mount_ids(m.path)
    try:
        for fg in ([], ["-f"]):  # refused before daemonizing too
            r = run(fg + ["--endpoints", etcd.endpoints, m.path], timeout=20)
            assert r.returncode != 0, r
            assert "mount point %s: a coordfs is already mounted there" % m.path in r.stderr, r.stderr
            assert harness.mount_ids(m.path) == before
    finally:
        # the old code stacked a second daemon on top: unmount that one, not ours
        for _ in harness.mount_ids(m.path) - before:
            harness.fusermount_u(m.path)
    assert m.on_top
    with open(os.path.join(m.path, "config", "k"), "w") as f:
        f.write("still here")
    assert etcd.get("/config/k") == "still here"
    # the same through a path that is not canonical
    r = run(["--endpoints", etcd.endpoints, m.path + "/."], timeout=20)
    assert r.returncode != 0 and "already mounted" in r.stderr, r.stderr
    assert harness.mount_ids(m.path) == before
