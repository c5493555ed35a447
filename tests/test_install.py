"""test_install.py — coord installed like a package (issue 9).

`make install` into a temporary DESTDIR, then:
  - the layout: libcoord.so.0.1.0 with soname libcoord.so.0 and its symlinks,
    libcoord.a, coord.h, libcoord.pc, coordfs + mount.fuse.coordfs, tools,
    man pages, systemd units;
  - a small program built against the *installed* library with
    `pkg-config --cflags --libs libcoord` (PKG_CONFIG_SYSROOT_DIR, and
    --define-variable=prefix=...), then run against a real etcd; the same
    linked statically against libcoord.a with `pkg-config --static`;
  - `make uninstall` removes every file it installed;
  - the installed coordfs mounted the three ways a system mounts it:
    `mount -t fuse.coordfs SOURCE DIR`, the helper mount.fuse.coordfs, and an
    fstab line (`mount -T FSTAB DIR`); each daemonizes and is unmounted with
    umount, after which the daemon must exit by itself;
  - `make deb` builds the Debian packages (about 1 CPU-minute; several
    minutes of wall time on a busy machine; COORD_DEB_DIR=dir reuses .debs
    already built there); their contents are checked, and they install into
    and remove cleanly from a scratch dpkg database (dpkg --root; the real
    system is never touched).
"""

import glob
import os
import re
import signal
import shutil
import subprocess
import textwrap
import time

import pytest

import harness
from harness import run_prog

REPO = harness.REPO
SANITIZE = harness.SANITIZE
SANFLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if SANITIZE else []


def make(*args, timeout=600):
    argv = ["make", "-C", REPO, "--no-print-directory", "B=" + harness.build_dir(),
            "SANITIZE=" + ("1" if SANITIZE else "")] + list(args)
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       stdin=subprocess.DEVNULL, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError("%s failed (%s):\n%s" % (" ".join(argv), r.returncode, r.stdout[-6000:]))
    return r.stdout


@pytest.fixture(scope="module")
def destdir(tmp_path_factory):
    if not harness.have_build("coordfs") or not os.path.exists(harness.build_path("libcoord.so")):
        pytest.skip("libcoord/coordfs not built (run make)")
    d = str(tmp_path_factory.mktemp("destdir"))
    make("install", "PREFIX=/usr", "DESTDIR=" + d)
    return d


PROG = textwrap.dedent(r"""
    #include <coord.h>
    #include <stdio.h>

    int main(int argc, char **argv) {
      if (argc != 3) return 2;
      coord_t *c;
      int rc = coord_new(NULL, &c); /* $COORD_ENDPOINTS */
      if (rc) {
        fprintf(stderr, "coord_new: %s: %s\n", coord_strerror(rc), coord_last_error());
        return 1;
      }
      json_t *v = json_string(argv[2]); /* jansson: Requires: jansson in the .pc */
      rc = coord_config_set(c, argv[1], v);
      json_decref(v);
      json_t *got = NULL;
      if (!rc) rc = coord_config_get(c, argv[1], &got);
      if (rc) {
        fprintf(stderr, "config: %s: %s\n", coord_strerror(rc), coord_last_error());
        coord_close(c);
        return 1;
      }
      printf("%s=%s\n", argv[1], json_is_string(got) ? json_string_value(got) : "?");
      json_decref(got);
      coord_lock_t *l;
      rc = coord_lock_acquire(c, "installed", 5000, 10000, &l);
      if (rc) {
        fprintf(stderr, "lock: %s: %s\n", coord_strerror(rc), coord_last_error());
        coord_close(c);
        return 1;
      }
      printf("token=%lld version=%d.%d.%d\n", (long long)coord_lock_token(l), COORD_VERSION_MAJOR,
             COORD_VERSION_MINOR, COORD_VERSION_PATCH);
      coord_lock_unlock(l);
      coord_close(c);
      return 0;
    }
""")


def pkg_config(destdir, *args, sysroot=True):
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(destdir, "usr/lib/pkgconfig"))
    env.pop("PKG_CONFIG_SYSROOT_DIR", None)
    if sysroot:
        env["PKG_CONFIG_SYSROOT_DIR"] = destdir
    r = subprocess.run(["pkg-config"] + list(args) + ["libcoord"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def compile_prog(destdir, tmp_path, name, flags):
    src = tmp_path / "prog.c"
    src.write_text(PROG)
    out = str(tmp_path / name)
    argv = ["cc", "-Wall", "-Werror"] + SANFLAGS + [str(src), "-o", out] + flags
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, "%s\n%s" % (" ".join(argv), r.stdout)
    return out


def test_layout(destdir):
    lib = os.path.join(destdir, "usr/lib")
    assert os.path.isfile(os.path.join(lib, "libcoord.so.0.1.0"))
    assert os.readlink(os.path.join(lib, "libcoord.so.0")) == "libcoord.so.0.1.0"
    assert os.readlink(os.path.join(lib, "libcoord.so")) == "libcoord.so.0"
    dyn = subprocess.run(["readelf", "-d", os.path.join(lib, "libcoord.so.0.1.0")],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    assert "Library soname: [libcoord.so.0]" in dyn
    for f in ["usr/lib/libcoord.a", "usr/include/coord.h", "usr/lib/pkgconfig/libcoord.pc",
              "usr/share/man/man1/coord-lock.1", "usr/share/man/man3/libcoord.3", "usr/share/man/man8/coordfs.8",
              "usr/lib/systemd/system/coordfs@.service", "usr/share/doc/coord/examples/coord.mount",
              "usr/share/doc/coord/examples/deploy.sh"]:
        assert os.path.isfile(os.path.join(destdir, f)), f
    for f in ["usr/sbin/coordfs", "usr/bin/coord-register", "usr/bin/coord-env",
              "usr/bin/coord-config-watch", "usr/bin/coord-xds", "usr/bin/coord-lock"]:
        assert os.access(os.path.join(destdir, f), os.X_OK), f
    assert os.readlink(os.path.join(destdir, "usr/sbin/mount.fuse.coordfs")) == "/sbin/mount.fuse3"
    unit = open(os.path.join(destdir, "usr/lib/systemd/system/coordfs@.service")).read()
    assert "ExecStart=/usr/sbin/coordfs " in unit and "@SBINDIR@" not in unit
    pc = open(os.path.join(destdir, "usr/lib/pkgconfig/libcoord.pc")).read()
    assert "prefix=/usr\n" in pc and "libdir=${prefix}/lib\n" in pc and "Requires: jansson" in pc
    # the man pages render without warnings
    pages = ["usr/share/man/man1/coord-lock.1", "usr/share/man/man3/libcoord.3", "usr/share/man/man8/coordfs.8"]
    for page in [] if not shutil.which("man") else pages:
        r = subprocess.run(["man", "--warnings", "-l", os.path.join(destdir, page)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, MANWIDTH="80"), timeout=60)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
        assert "SYNOPSIS" in r.stdout


def test_pkg_config_flags(destdir):
    flags = pkg_config(destdir, "--cflags", "--libs")
    assert "-I%s/usr/include" % destdir in flags
    assert "-L%s/usr/lib" % destdir in flags and "-lcoord" in flags
    assert "-ljansson" in flags  # Requires: jansson (coord.h includes jansson.h)
    # --define-variable relocates every path (they all derive from ${prefix})
    flags2 = pkg_config(destdir, "--define-variable=prefix=%s/usr" % destdir, "--cflags", "--libs",
                        sysroot=False)
    assert "-I%s/usr/include" % destdir in flags2 and "-L%s/usr/lib" % destdir in flags2
    assert pkg_config(destdir, "--modversion") == ["0.1.0"]
    static = pkg_config(destdir, "--static", "--libs")
    assert "-lgrpc" in static and "-lprotobuf-c" in static


def test_program_against_installed_library(destdir, tmp_path, etcd):
    flags = pkg_config(destdir, "--cflags", "--libs")
    prog = compile_prog(destdir, tmp_path, "prog", flags)
    libdir = os.path.join(destdir, "usr/lib")
    needed = subprocess.run(["readelf", "-d", prog], stdout=subprocess.PIPE, text=True, check=True).stdout
    assert "Shared library: [libcoord.so.0]" in needed
    env = dict(os.environ, LD_LIBRARY_PATH=libdir)
    ldd = subprocess.run(["ldd", prog], stdout=subprocess.PIPE, text=True, env=env, check=True).stdout
    assert "libcoord.so.0 => %s/libcoord.so.0" % libdir in ldd, ldd
    out = run_prog(prog, "installed/key", "hello", endpoints=etcd, env=env, timeout=60)
    assert "installed/key=hello" in out and "version=0.1.0" in out
    assert etcd.get("/config/installed/key") is not None

    # --define-variable instead of a sysroot
    flags2 = pkg_config(destdir, "--define-variable=prefix=%s/usr" % destdir, "--cflags", "--libs",
                        sysroot=False)
    prog2 = compile_prog(destdir, tmp_path, "prog2", flags2)
    assert "installed/two=2" in run_prog(prog2, "installed/two", "2", endpoints=etcd, env=env, timeout=60)

    # statically against libcoord.a: --static adds the private requirements
    static = [f if f != "-lcoord" else "-l:libcoord.a" for f in pkg_config(destdir, "--static", "--cflags",
                                                                           "--libs")]
    prog3 = compile_prog(destdir, tmp_path, "prog3", static)
    dyn = subprocess.run(["readelf", "-d", prog3], stdout=subprocess.PIPE, text=True, check=True).stdout
    assert "libcoord" not in dyn
    assert "installed/three=3" in run_prog(prog3, "installed/three", "3", endpoints=etcd,
                                           env=dict(os.environ), timeout=60)

    # the installed coord-lock runs a command holding a lock
    tool = os.path.join(destdir, "usr/bin/coord-lock")
    out = run_prog(tool, "installed", "--", "sh", "-c", "echo token=$COORD_LOCK_TOKEN", endpoints=etcd, timeout=60)
    assert re.match(r"token=\d+$", out.strip()), out


def test_uninstall_removes_everything(tmp_path):
    if not harness.have_build("coordfs"):
        pytest.skip("coordfs not built")
    d = str(tmp_path / "root")
    make("install", "PREFIX=/opt/coord", "DESTDIR=" + d)
    files = [p for p in glob.glob(d + "/**", recursive=True) if not os.path.isdir(p) or os.path.islink(p)]
    assert any(p.endswith("/opt/coord/lib/libcoord.so.0.1.0") for p in files)
    pc = open(d + "/opt/coord/lib/pkgconfig/libcoord.pc").read()
    assert "prefix=/opt/coord\n" in pc
    make("uninstall", "PREFIX=/opt/coord", "DESTDIR=" + d)
    left = [p for p in glob.glob(d + "/**", recursive=True) if not os.path.isdir(p) or os.path.islink(p)]
    assert left == [], left


# ------------------------------------------------------------------ mounting

def _daemon_pids(mountpoint):
    """PIDs of coordfs processes whose command line names this mount point
    (a daemonized coordfs is not our child: this is how we find it)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % p, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"coordfs" and mountpoint.encode() in argv:
            pids.append(int(p))
    return pids


MOUNT_WAYS = ["helper", "mount-t", "fstab", "fstab-fuse-hash"]


def _wait_gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if os.path.exists("/proc/%d" % p)]
        time.sleep(0.05)
    for p in alive:  # only the coordfs that served this mount point
        os.kill(p, 9)
    return alive


@pytest.mark.parametrize("way", MOUNT_WAYS)
def test_mount_like_a_system(destdir, tmp_path, etcd, way):
    """mount.fuse.coordfs directly; `mount -t fuse.coordfs`; an fstab line.

    mount(8) runs its helpers with a clean environment, so /bin/sh's default
    PATH finds `coordfs`: for the last two ways the test runs in a private
    mount namespace (unshare --mount) where the DESTDIR's sbin is bound on
    /usr/local/sbin, as if installed with PREFIX=/usr/local."""
    if not shutil.which("mount") or not shutil.which("unshare"):
        pytest.skip("no mount(8) or unshare(1)")
    value = "via-" + way
    etcd.put("/config/mounted/key", value)
    mnt = str(tmp_path / "coord")
    os.makedirs(mnt)
    sbin = os.path.join(destdir, "usr/sbin")
    env = harness.prog_env(dict(os.environ, PATH=sbin + ":" + os.environ.get("PATH", "/usr/bin:/bin")))
    env.pop("COORD_ENDPOINTS", None)  # the endpoints come from the mount source
    opts = "_netdev,lock-ttl=5s,service_ttl=5s"
    if way == "helper":
        try:
            r = subprocess.run([os.path.join(sbin, "mount.fuse.coordfs"), etcd.endpoints, mnt, "-o", opts],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               stdin=subprocess.DEVNULL, timeout=60)
            assert r.returncode == 0, r.stdout
            assert harness.mounted(mnt)
            pids = _daemon_pids(mnt)
            assert len(pids) == 1, pids
            assert os.readlink("/proc/%d/exe" % pids[0]) == os.path.join(sbin, "coordfs")
            with open(os.path.join(mnt, "config/mounted/key")) as f:
                assert f.read() == value
            fstype = [l.split()[2] for l in open("/proc/self/mounts") if l.split()[1] == mnt]
            assert fstype == ["fuse.coordfs"], fstype
        finally:
            pids = _daemon_pids(mnt)
            if harness.mounted(mnt):
                r = subprocess.run(["umount", mnt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, timeout=30)
                if r.returncode != 0:
                    harness.fusermount_u(mnt, lazy=True)
            alive = _wait_gone(pids)
        assert not harness.mounted(mnt)
        assert not alive, "coordfs %s did not exit after umount" % alive
        return

    if way == "mount-t":
        mount = "mount -t fuse.coordfs %s %s -o %s" % (etcd.endpoints, mnt, opts)
    elif way == "fstab":
        fstab = tmp_path / "fstab"
        fstab.write_text("# test\n%s %s fuse.coordfs defaults,%s 0 0\n" % (etcd.endpoints, mnt, opts))
        mount = "mount -T %s %s" % (fstab, mnt)
    else:  # the older form: type fuse, source PROGRAM#SOURCE
        fstab = tmp_path / "fstab"
        fstab.write_text("coordfs#%s %s fuse defaults,%s 0 0\n" % (etcd.endpoints, mnt, opts))
        mount = "mount -T %s %s" % (fstab, mnt)
    script = """
        set -e
        mount --make-rprivate /
        mount --bind {sbin} /usr/local/sbin
        {mount}
        trap 'umount {mnt} || umount -l {mnt}' EXIT
        readlink /proc/$(pgrep -n -f "coordfs .*{mnt}")/exe
        awk '$2 == "{mnt}" {{print $3}}' /proc/self/mounts
        cat {mnt}/config/mounted/key; echo
    """.format(sbin=sbin, mount=mount, mnt=mnt)
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    alive = _wait_gone(_daemon_pids(mnt))
    assert r.returncode == 0, r.stdout
    lines = r.stdout.split()
    assert lines == ["/usr/local/sbin/coordfs", "fuse.coordfs", value], r.stdout
    assert not alive, "coordfs %s did not exit after umount" % alive


# ------------------------------------------------------------------ Debian package

@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    if SANITIZE:
        pytest.skip("the package is built without sanitizers: checked by the plain `make test`")
    for tool in ("dpkg-buildpackage", "dh"):
        if not shutil.which(tool):
            pytest.skip("%s not installed (scripts/install-deps installs it)" % tool)
    pre = os.environ.get("COORD_DEB_DIR")  # .debs already built by `make deb DEBDIR=...`
    if pre and glob.glob(os.path.join(pre, "*.deb")):
        return {os.path.basename(p).split("_")[0]: p for p in glob.glob(os.path.join(pre, "*.deb"))}
    d = str(tmp_path_factory.mktemp("deb"))
    # not make(): no B=/SANITIZE= on the command line, the package builds its own way
    r = subprocess.run(["make", "-C", REPO, "--no-print-directory", "deb", "DEBDIR=" + d],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-8000:]
    found = {os.path.basename(p).split("_")[0]: p for p in glob.glob(os.path.join(d, "*.deb"))}
    return found


def _contents(deb):
    out = subprocess.run(["dpkg-deb", "--contents", deb], stdout=subprocess.PIPE, text=True, check=True).stdout
    return [l.split()[5].lstrip(".") + (" -> " + l.split()[7] if " -> " in l else "")
            for l in out.splitlines() if len(l.split()) >= 6]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_deb_builds_installs_and_removes(debs, tmp_path):
    assert set(debs) >= {"libcoord0", "libcoord-dev", "coordfs"}, debs
    multi = subprocess.run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], stdout=subprocess.PIPE, text=True,
                           check=True).stdout.strip()
    lib0 = "\n".join(_contents(debs["libcoord0"]))
    assert "/usr/lib/%s/libcoord.so.0.1.0" % multi in lib0
    assert "/usr/lib/%s/libcoord.so.0 -> libcoord.so.0.1.0" % multi in lib0
    dev = "\n".join(_contents(debs["libcoord-dev"]))
    for f in ["/usr/include/coord.h", "/usr/lib/%s/libcoord.a" % multi, "/usr/lib/%s/pkgconfig/libcoord.pc" % multi,
              "/usr/lib/%s/libcoord.so -> libcoord.so.0" % multi, "/usr/share/man/man3/libcoord.3.gz"]:
        assert f in dev, f
    fs = "\n".join(_contents(debs["coordfs"]))
    for f in ["/usr/sbin/coordfs", "/usr/sbin/mount.fuse.coordfs -> /sbin/mount.fuse3",
              "/usr/share/man/man8/coordfs.8.gz", "/lib/systemd/system/coordfs@.service",
              "/usr/bin/coord-register", "/usr/bin/coord-env", "/usr/bin/coord-lock",
              "/usr/share/man/man1/coord-lock.1.gz"]:
        assert f in fs, f
    info = subprocess.run(["dpkg-deb", "-f", debs["coordfs"], "Depends"], stdout=subprocess.PIPE, text=True,
                          check=True).stdout
    assert "fuse3" in info, info

    # install and remove in a scratch root with its own dpkg database
    root = str(tmp_path / "root")
    os.makedirs(root + "/var/lib/dpkg/updates")
    os.makedirs(root + "/var/lib/dpkg/info")
    open(root + "/var/lib/dpkg/status", "w").close()
    dpkg = ["dpkg", "--root=" + root, "--force-not-root", "--force-depends", "--force-script-chrootless",
            "--log=/dev/null"]
    order = [debs["libcoord0"], debs["libcoord-dev"], debs["coordfs"]]
    r = subprocess.run(dpkg + ["-i"] + order, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout
    assert os.path.isfile(root + "/usr/sbin/coordfs")
    assert os.path.islink(root + "/usr/lib/%s/libcoord.so.0" % multi)
    st = subprocess.run(dpkg[:2] + ["-s", "coordfs"], stdout=subprocess.PIPE, text=True).stdout
    assert "Status: install ok installed" in st
    r = subprocess.run(dpkg + ["--purge", "coordfs", "libcoord-dev", "libcoord0"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 0, r.stdout
    left = [p for p in glob.glob(root + "/**", recursive=True)
            if (not os.path.isdir(p) or os.path.islink(p)) and "/var/lib/dpkg/" not in p
            and "/var/log/" not in p]
    assert left == [], left


# ------------------------------------------------------------------ logging

def test_foreground_debug_logs_fuse_requests_and_etcd_calls(etcd, coordfs_mount):
    etcd.put("/config/logged/key", "v1")
    m = coordfs_mount(etcd, "-d")
    with open(m.join("config/logged/key")) as f:
        assert f.read() == "v1"
    etcd.put("/config/logged/key", "v2")
    wait = time.monotonic() + 10
    while "watch event PUT logged/key" not in m.log() and "watch event PUT /config/logged/key" not in m.log():
        assert time.monotonic() < wait, m.log()[-3000:]
        time.sleep(0.05)
    log = m.log()
    assert "notice: mounted %s" % m.path in log
    assert "opcode: LOOKUP" in log  # libfuse's request trace, through our log
    assert "debug: etcd connect endpoints=%s" % etcd.endpoints in log
    assert "debug: etcd Range /config/" in log or "debug: etcd Watch /config/" in log, log[-3000:]


def test_foreground_default_level_is_quiet(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    os.listdir(m.join("config"))
    log = m.log()
    assert "notice: mounted %s" % m.path in log
    assert "debug:" not in log and "opcode:" not in log


def test_daemon_logs_to_syslog(tmp_path, etcd):
    """coordfs without -f logs to syslog.  No syslog daemon runs here: in a
    private mount namespace a directory with our own /dev/log (a datagram
    socket this test reads), /dev/null and /dev/fuse is bound on /dev."""
    import socket
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1)")
    binary = harness.require_build("coordfs")
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "null").touch()
    (dev / "fuse").touch()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(dev / "log"))
    sock.settimeout(0.2)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    etcd.put("/config/sys/key", "logged")
    script = """
        set -e
        mount --bind /dev/null {dev}/null
        mount --bind /dev/fuse {dev}/fuse
        mount --rbind {dev} /dev
        {coordfs} --endpoints {ep} {mnt}
        trap 'umount {mnt} || umount -l {mnt}' EXIT
        cat {mnt}/config/sys/key; echo
    """.format(dev=dev, coordfs=binary, ep=etcd.endpoints, mnt=mnt)
    env = harness.prog_env(dict(os.environ, COORDFS_LOG_LEVEL="debug"))
    try:
        r = subprocess.run(["unshare", "--mount", "sh", "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
        alive = _wait_gone(_daemon_pids(mnt))
        assert r.returncode == 0, r.stdout
        assert r.stdout.split() == ["logged"], r.stdout
        assert not alive
        msgs = []
        while True:
            try:
                msgs.append(sock.recv(65536).decode(errors="replace"))
            except socket.timeout:
                break
    finally:
        sock.close()
    text = "\n".join(msgs)
    # <29> = facility daemon (3 << 3) + notice (5); <31> = daemon + debug
    assert any(m.startswith("<29>") and "coordfs[" in m and "mounted %s" % mnt in m for m in msgs), text[:3000]
    assert any(m.startswith("<31>") and "etcd Range" in m for m in msgs), text[:3000]
    assert any("unmounting %s" % mnt in m for m in msgs), text[-3000:]


# ------------------------------------------------------------------ systemd units (no systemd here)

def _unit(path):
    import configparser
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(path)
    return cp


def test_systemd_units_do_what_systemd_would(destdir, tmp_path, etcd):
    """systemd does not run here: do what it would do with the installed
    units.  coordfs@X.service: Type=forking, so ExecStart must return once
    mounted, with $COORDFS_OPTS split into words; coord.mount: mount -t Type
    What Where -o Options (run in a private mount namespace, as for fstab)."""
    etcd.put("/config/unit/key", "from-unit")
    svc = _unit(os.path.join(destdir, "usr/lib/systemd/system/coordfs@.service"))
    assert svc["Service"]["Type"] == "forking"
    mnt = str(tmp_path / "srv" / "coord")
    env = harness.prog_env(dict(os.environ, COORD_ENDPOINTS=etcd.endpoints, COORDFS_OPTS="--lock-ttl=5s -o ro"))
    # /%I is the unescaped instance: coordfs@srv-coord.service -> /srv/coord
    pre = svc["Service"]["ExecStartPre"].replace("/%I", mnt)
    start = svc["Service"]["ExecStart"].replace("/%I", mnt)
    assert start == "/usr/sbin/coordfs $COORDFS_OPTS " + mnt, start
    start = start.replace("/usr/sbin/coordfs", os.path.join(destdir, "usr/sbin/coordfs"), 1)
    run = lambda cmd: subprocess.run(["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    r = run(pre)
    assert r.returncode == 0, r.stdout
    try:
        r = run(start)  # returns when mounted (forking)
        assert r.returncode == 0, r.stdout
        assert harness.mounted(mnt)
        with open(os.path.join(mnt, "config/unit/key")) as f:
            assert f.read() == "from-unit"
        with pytest.raises(OSError):  # -o ro from COORDFS_OPTS
            with open(os.path.join(mnt, "config/unit/key"), "w") as f:
                f.write("x")
    finally:
        pids = _daemon_pids(mnt)
        if harness.mounted(mnt):
            pid = pids[0] if pids else None
            if pid:
                os.kill(pid, signal.SIGTERM)  # systemctl stop: SIGTERM to the main PID
            wait = time.monotonic() + 15
            while harness.mounted(mnt) and time.monotonic() < wait:
                time.sleep(0.05)
            if harness.mounted(mnt):
                harness.fusermount_u(mnt, lazy=True)
        alive = _wait_gone(pids)
    assert not harness.mounted(mnt), "SIGTERM did not unmount"
    assert not alive

    m = _unit(os.path.join(destdir, "usr/share/doc/coord/examples/coord.mount"))["Mount"]
    assert m["Where"] == "/coord" and m["Type"] == "fuse.coordfs"
    mnt2 = str(tmp_path / "mnt2")
    os.makedirs(mnt2)
    script = """
        set -e
        mount --bind {sbin} /usr/local/sbin
        mount -t {type} {what} {where} -o {opts}
        trap 'umount {where} || umount -l {where}' EXIT
        cat {where}/config/unit/key; echo
    """.format(sbin=os.path.join(destdir, "usr/sbin"), type=m["Type"], what=etcd.endpoints, where=mnt2,
               opts=m["Options"])
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=60)
    alive = _wait_gone(_daemon_pids(mnt2))
    assert r.returncode == 0, r.stdout
    assert r.stdout.split() == ["from-unit"], r.stdout
    assert not alive
