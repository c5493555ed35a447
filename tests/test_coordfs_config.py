"""test_coordfs_config.py — /config on a real coordfs mount over a real etcd.

Shell tools (echo, cat, cp, mv, rm, mkdir, ls -R, >>, truncate, getfattr)
behave as on a local file system, and etcd (read with etcdctl) holds exactly
what was written.  Also: reads see etcdctl's changes at once, concurrent
writers never mix, a conflicting append fails its close (EBUSY), EFBIG for
over-large values, odd names, keys that cannot be file names.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from harness import wait_for


def sh(cmd, check=True):
    r = subprocess.run(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError("%s: exit %d\n%s%s" % (cmd, r.returncode, r.stdout, r.stderr))
    return r


def q(p):
    return "'" + p.replace("'", "'\\''") + "'"


@pytest.fixture
def fs(etcd, coordfs_mount):
    return coordfs_mount(etcd)


def C(m, *parts):
    return os.path.join(m.path, "config", *parts)


def read(path):
    with open(path, "rb") as f:
        return f.read().decode()


def test_echo_cat_and_etcd_holds_exactly_it(etcd, fs):
    sh("echo hello > %s" % q(C(fs, "app")))
    assert etcd.get("/config/app") == "hello\n"
    assert read(C(fs, "app")) == "hello\n"
    sh("printf 'no newline' > %s" % q(C(fs, "app")))
    assert etcd.get("/config/app") == "no newline"
    assert sh("cat %s" % q(C(fs, "app"))).stdout == "no newline"
    assert os.stat(C(fs, "app")).st_size == len("no newline")


def test_append_and_truncate(etcd, fs):
    p = C(fs, "log")
    sh("echo one > %s && echo two >> %s && echo three >> %s" % (q(p), q(p), q(p)))
    assert etcd.get("/config/log") == "one\ntwo\nthree\n"
    sh("truncate -s 3 %s" % q(p))
    assert etcd.get("/config/log") == "one"
    assert read(p) == "one"
    sh("truncate -s 5 %s" % q(p))
    assert etcd.get("/config/log", raw=True) == b"one\0\0"
    sh(": > %s" % q(p))
    wait_for(lambda: etcd.get("/config/log") == "", 5, what="empty value")
    assert read(p) == ""


def test_truncating_close_is_committed_when_close_returns(etcd, fs):
    """An O_TRUNC open closed without writing (`: > f`, `cp /dev/null f`)
    is committed by the FLUSH of that close when the closing process has
    no other descriptor on the file, not by the RELEASE the kernel sends
    afterwards: read back at once, the file is empty (one read in five used
    to see the old value)."""
    p = C(fs, "tr")
    for i in range(100):
        with open(p, "w") as f:
            f.write("old%d" % i)
        os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
        with open(p) as f:
            assert f.read() == "", i
    assert etcd.get("/config/tr") == ""
    # the same for a write closed from another thread of the process
    for i in range(20):
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"t%d" % i)
        t = threading.Thread(target=os.close, args=(fd,))
        t.start()
        t.join()
        assert read(p) == "t%d" % i


def version(etcd, key):
    r = etcd.etcdctl_json("get", key)
    return int(r["kvs"][0]["version"]) if r.get("kvs") else 0


@pytest.mark.parametrize("script,value", [
    ('exec 3>"$F"; sleep 0.1; echo x >&3; exec 3>&-', "x\n"),  # a child closes its inherited copy
    ('{ echo a; sleep 0.1; echo b; } > "$F"', "a\nb\n"),  # a child exits between two writes
    ('exec 3>"$F"; echo a >&3; echo b >&3; exec 3>&-', "a\nb\n"),  # each >&3 closes a dup
    ('echo hi > "$F"', "hi\n"),
    (': > "$F"', ""),
    ('exec 3>"$F"; exec 3>&-', ""),
    ('printf x >> "$F"', "seedx"),
])
def test_shell_write_is_one_put(etcd, fs, script, value):
    """Each shell write to a config file is one Put of the whole value:
    the closes of dups and of inherited copies publish nothing in between
    (no empty or partial value reaches a watcher)."""
    p = C(fs, "sh")
    sh("printf seed > %s" % q(p))
    v0 = version(etcd, "/config/sh")
    r = subprocess.run(["bash", "-c", script], env=dict(os.environ, F=p), timeout=30)
    assert r.returncode == 0
    assert etcd.get("/config/sh") == value
    assert version(etcd, "/config/sh") == v0 + 1
    assert read(p) == value


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare(1)")
def test_flush_without_proc_keeps_the_old_rule(etcd, coordfs_mount):
    """coordfs in a pid namespace of its own sees its callers as pid 0, so
    /proc cannot say whether a close is the opener's last (procfd.c's
    "cannot tell"): a FLUSH then commits after a write, as before, and an
    unwritten truncation at RELEASE.  Every value still arrives whole."""
    m = coordfs_mount(etcd, wrap=["unshare", "--pid", "--fork", "--kill-child"])
    p = C(m, "np")
    sh("printf x > %s" % q(p))
    assert etcd.get("/config/np") == "x"  # committed by the FLUSH: before close() returned
    assert read(p) == "x"
    sh("{ echo a; sleep 0.1; echo b; } > %s" % q(p))
    assert etcd.get("/config/np") == "a\nb\n"
    sh(": > %s" % q(p))
    wait_for(lambda: etcd.get("/config/np") == "", 5, what="the truncation, at RELEASE")
    assert read(p) == ""


def test_cp_mv_rm(etcd, fs, tmp_path):
    local = tmp_path / "src.json"
    local.write_text('{"a": 1}\n')
    sh("cp %s %s" % (q(str(local)), q(C(fs, "copied"))))
    assert etcd.get("/config/copied") == '{"a": 1}\n'
    sh("cp %s %s" % (q(C(fs, "copied")), q(C(fs, "copy2"))))
    assert etcd.get("/config/copy2") == '{"a": 1}\n'
    rev_before = int(etcd.etcdctl_json("get", "/config/copy2")["header"]["revision"])
    sh("mv %s %s" % (q(C(fs, "copy2")), q(C(fs, "moved"))))
    # one Txn: one new revision for the put and the delete together
    r = etcd.etcdctl_json("get", "/config/moved")
    assert int(r["header"]["revision"]) == rev_before + 1
    assert etcd.get("/config/copy2") is None
    assert etcd.get("/config/moved") == '{"a": 1}\n'
    assert not os.path.exists(C(fs, "copy2"))
    assert read(C(fs, "moved")) == '{"a": 1}\n'
    sh("rm %s" % q(C(fs, "moved")))
    assert etcd.get("/config/moved") is None
    assert not os.path.exists(C(fs, "moved"))
    sh("cp %s %s" % (q(C(fs, "copied")), q(str(tmp_path / "back"))))
    assert (tmp_path / "back").read_text() == '{"a": 1}\n'


def test_mkdir_ls_R_rmdir(etcd, fs):
    sh("mkdir -p %s" % q(C(fs, "svc", "db")))
    assert os.path.isdir(C(fs, "svc", "db"))
    assert etcd.get_prefix("/config/") == {}  # directories are mount-local
    sh("echo 5432 > %s" % q(C(fs, "svc", "db", "port")))
    sh("echo x > %s" % q(C(fs, "svc", "name")))
    out = sh("cd %s && ls -R" % q(C(fs))).stdout
    assert out.split("\n\n") == [".:\nsvc", "./svc:\ndb\nname", "./svc/db:\nport\n"]
    assert etcd.get_prefix("/config/") == {"/config/svc/db/port": "5432\n", "/config/svc/name": "x\n"}
    r = sh("rmdir %s" % q(C(fs, "svc")), check=False)
    assert r.returncode != 0 and "not empty" in r.stderr
    sh("mkdir %s && rmdir %s" % (q(C(fs, "empty")), q(C(fs, "empty"))))
    assert not os.path.exists(C(fs, "empty"))
    sh("rm %s && rm %s" % (q(C(fs, "svc", "db", "port")), q(C(fs, "svc", "name"))))
    assert etcd.get_prefix("/config/") == {}
    # as on a local disk, the emptied directories stay until removed
    assert os.listdir(C(fs, "svc")) == ["db"] and os.listdir(C(fs, "svc", "db")) == []
    sh("rmdir %s && rmdir %s" % (q(C(fs, "svc", "db")), q(C(fs, "svc"))))
    assert os.listdir(C(fs)) == []


def test_rm_r_of_a_tree_of_keys(etcd, fs):
    """`rm -r` empties each directory and then removes it: the emptied
    directory must still be there for its rmdir (it used to vanish with
    its last key, and rm -r failed with ENOENT)."""
    for k in ("t/a", "t/b/c", "t/b/d/e", "t/x/y"):
        etcd.put("/config/" + k, k)
    wait_for(lambda: os.path.exists(C(fs, "t", "b", "d", "e")), 5, what="t/b/d/e")
    sh("mkdir %s" % q(C(fs, "t", "b", "local")))
    sh("rm -r %s" % q(C(fs, "t")))
    assert etcd.get_prefix("/config/") == {}
    assert os.listdir(C(fs)) == []
    sh("mkdir -p %s && echo 1 > %s" % (q(C(fs, "u", "v")), q(C(fs, "u", "v", "w"))))
    sh("rm -rf %s" % q(C(fs, "u")))
    assert etcd.get_prefix("/config/") == {} and os.listdir(C(fs)) == []


def test_emptied_directory_stays_here_goes_elsewhere(etcd, coordfs_mount):
    """The mount that empties a directory keeps it (rm, mv away); another
    mount, which never saw it emptied, loses it with its last key."""
    a, b = coordfs_mount(etcd), coordfs_mount(etcd)
    sh("mkdir -p %s && echo 1 > %s && echo 2 > %s" % (q(C(a, "d")), q(C(a, "d", "f")), q(C(a, "d", "g"))))
    wait_for(lambda: os.path.exists(C(b, "d", "g")), 5, what="d/g on b")
    sh("rm %s && mv %s %s" % (q(C(a, "d", "f")), q(C(a, "d", "g")), q(C(a, "g"))))
    assert etcd.get_prefix("/config/") == {"/config/g": "2\n"}
    assert os.path.isdir(C(a, "d")) and os.listdir(C(a, "d")) == []
    assert sorted(os.listdir(C(a))) == ["d", "g"]
    wait_for(lambda: sorted(os.listdir(C(b))) == ["g"], 5, what="d gone on b")
    assert not os.path.exists(C(b, "d"))
    r = sh("rmdir %s" % q(C(b, "d")), check=False)
    assert r.returncode != 0 and "No such file" in r.stderr
    sh("rmdir %s" % q(C(a, "d")))
    assert sorted(os.listdir(C(a))) == ["g"]


def test_mkdir_inside_a_key_directory_survives_the_keys(etcd, fs):
    """A directory made here inside one that exists because of keys keeps
    its parent when another client deletes those keys."""
    etcd.put("/config/app/x", "1")
    wait_for(lambda: os.path.exists(C(fs, "app", "x")), 5, what="app/x")
    sh("mkdir -p %s" % q(C(fs, "app", "local", "deep")))
    etcd.etcdctl("del", "/config/app/x")
    wait_for(lambda: not os.path.exists(C(fs, "app", "x")), 5, what="app/x gone")
    assert os.listdir(C(fs)) == ["app"]
    assert os.listdir(C(fs, "app")) == ["local"] and os.listdir(C(fs, "app", "local")) == ["deep"]
    r = sh("rmdir %s" % q(C(fs, "app", "local")), check=False)
    assert r.returncode != 0 and "not empty" in r.stderr
    sh("rmdir %s %s %s" % (q(C(fs, "app", "local", "deep")), q(C(fs, "app", "local")), q(C(fs, "app"))))
    assert os.listdir(C(fs)) == []
    assert etcd.get_prefix("/config/") == {}


def test_mv_directory_takes_its_empty_subdirectories(etcd, fs):
    sh("mkdir -p %s %s && echo 1 > %s" % (q(C(fs, "p", "q", "e")), q(C(fs, "p", "empty")),
                                          q(C(fs, "p", "q", "f"))))
    sh("mv %s %s" % (q(C(fs, "p")), q(C(fs, "r"))))
    assert etcd.get_prefix("/config/") == {"/config/r/q/f": "1\n"}
    out = sh("cd %s && find . | sort" % q(C(fs))).stdout.split()
    assert out == [".", "./r", "./r/empty", "./r/q", "./r/q/e", "./r/q/f"]
    sh("mkdir -p %s && mv %s %s" % (q(C(fs, "only", "sub")), q(C(fs, "only")), q(C(fs, "r", "only"))))
    assert os.path.isdir(C(fs, "r", "only", "sub")) and not os.path.exists(C(fs, "only"))
    assert etcd.get_prefix("/config/") == {"/config/r/q/f": "1\n"}


def test_key_that_is_also_a_prefix_has_dot_value(etcd, fs):
    etcd.put("/config/app", "top")
    etcd.put("/config/app/db", "child")
    wait_for(lambda: os.path.isdir(C(fs, "app")), 5, what="app is a directory")
    assert sorted(os.listdir(C(fs, "app"))) == [".value", "db"]
    assert read(C(fs, "app", ".value")) == "top"
    assert read(C(fs, "app", "db")) == "child"
    sh("printf new > %s" % q(C(fs, "app", ".value")))
    assert etcd.get("/config/app") == "new"
    sh("rm %s" % q(C(fs, "app", ".value")))
    assert etcd.get("/config/app") is None
    assert etcd.get("/config/app/db") == "child"
    assert os.listdir(C(fs, "app")) == ["db"]
    # the other way: the children go and the key stays, a file again
    sh("printf again > %s" % q(C(fs, "app", ".value")))
    sh("rm %s" % q(C(fs, "app", "db")))
    wait_for(lambda: os.path.isfile(C(fs, "app")), 5, what="app a file again")
    assert read(C(fs, "app")) == "again"
    assert etcd.get_prefix("/config/") == {"/config/app": "again"}


def test_getfattr_shows_etcd_metadata(etcd, fs):
    sh("echo a > %s && echo b > %s" % (q(C(fs, "k")), q(C(fs, "k"))))
    kv = etcd.etcdctl_json("get", "/config/k")["kvs"][0]
    out = sh("getfattr -d %s" % q(C(fs, "k"))).stdout
    attrs = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("user."))
    assert attrs["user.coord.create_revision"] == '"%d"' % kv["create_revision"]
    assert attrs["user.coord.mod_revision"] == '"%d"' % kv["mod_revision"]
    assert attrs["user.coord.version"] == '"2"'
    assert attrs["user.coord.lease"] == '"0"'
    lease = etcd.lease_grant(60)
    etcd.put("/config/leased", "v", "--lease=%x" % lease)
    wait_for(lambda: os.path.exists(C(fs, "leased")), 5, what="leased key")
    v = os.getxattr(C(fs, "leased"), "user.coord.lease").decode()
    assert int(v) == lease


def test_etcdctl_change_is_read_at_once(etcd, fs):
    p = C(fs, "x")
    etcd.put("/config/x", "s")
    wait_for(lambda: os.path.exists(p), 5, what="x")
    assert read(p) == "s"  # now in the page cache
    for i in range(20):
        v = "v%d-" % i + "y" * (i * 7)  # always longer than before
        etcd.put("/config/x", v)
        assert read(p) == v
        assert sh("cat %s" % q(p)).stdout == v
    etcd.put("/config/x", "short")
    assert read(p) == "short"


def test_two_concurrent_writers_leave_one_whole_value(etcd, fs):
    p = C(fs, "shared")
    size = 200_000
    prog = ("import os,sys\n"
            "c=sys.argv[2].encode()\n"
            "for r in range(5):\n"
            "  fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC)\n"
            "  for i in range(0, %d, 8192):\n"
            "    os.write(fd, c*min(8192, %d-i))\n"
            "  os.close(fd)\n" % (size, size))
    procs = [subprocess.Popen([sys.executable, "-c", prog, p, ch]) for ch in "AB"]
    for pr in procs:
        assert pr.wait(60) == 0
    v = etcd.get("/config/shared")
    assert len(v) == size and v in ("A" * size, "B" * size)
    assert read(p) == v


def _write_then_close_after(p, flags, data):
    """A child that opens p with flags, writes data, then closes when told
    (it must not fork while its descriptor is open: the child's
    close-on-exec would flush, i.e. commit, early).  Returns (child,
    close_result) where close_result() sends the go and returns 'closed'
    or the errno name of close()."""
    prog = ("import os,sys,errno\n"
            "fd=os.open(sys.argv[1], int(sys.argv[2]))\n"
            "os.write(fd, sys.argv[3].encode())\n"
            "print('written', flush=True)\n"
            "sys.stdin.readline()\n"
            "try:\n"
            "  os.close(fd); print('closed')\n"
            "except OSError as e:\n"
            "  print(errno.errorcode[e.errno])\n")
    child = subprocess.Popen([sys.executable, "-c", prog, p, str(flags), data], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "written"
    return lambda: child.communicate("go\n", timeout=30)[0].strip()


def test_conflicting_overwrite_fails_close_and_append_goes_after(etcd, fs):
    """A write in place (no O_TRUNC, no O_APPEND) that lost the race fails
    its close with EBUSY and writes nothing; an append that lost the race
    is put after the other writer's value (issue 13: appends lose no
    line)."""
    p = C(fs, "conf")
    sh("echo base > %s" % q(p))
    close = _write_then_close_after(p, os.O_WRONLY, "BASE")
    etcd.put("/config/conf", "theirs")
    assert close() == "EBUSY"
    assert etcd.get("/config/conf") == "theirs"
    wait_for(lambda: read(p) == "theirs", 5, what="their value read back")
    close = _write_then_close_after(p, os.O_WRONLY | os.O_APPEND, "mine\n")
    etcd.put("/config/conf", "theirs2")
    assert close() == "closed"
    assert etcd.get("/config/conf") == "theirs2mine\n"
    wait_for(lambda: read(p) == "theirs2mine\n", 5, what="the merged value read back")
    sh("printf theirs > %s" % q(p))
    # without a conflict the append commits with the compare
    sh("echo more >> %s" % q(p))
    assert etcd.get("/config/conf") == "theirsmore\n"


def test_overlarge_value_efbig_and_nothing_stored(etcd, fs):
    p = C(fs, "big")
    with pytest.raises(OSError) as e:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for _ in range(2 * 1024 // 64):
                os.write(fd, b"z" * 65536)
        finally:
            os.close(fd)
    assert e.value.errno == errno.EFBIG
    assert etcd.get("/config/big") is None
    sh("echo small > %s" % q(p))
    r = sh("head -c 3000000 /dev/zero > %s" % q(p), check=False)
    assert r.returncode != 0 and "too large" in r.stderr.lower()
    assert etcd.get("/config/big") == "small\n"
    # just under the limit is fine
    ok = b"o" * (1024 * 1024)
    with open(p, "wb") as f:
        f.write(ok)
    assert etcd.get("/config/big", raw=True) == ok


def test_odd_names(etcd, fs):
    names = ["with space", "ünïcödé-名前", "n" * 255, "dash-start", "quote'name"]
    for n in names:
        sh("printf %%s %s > %s" % (q(n[:10]), q(C(fs, n))))
        assert etcd.get("/config/" + n) == n[:10], n
        assert read(C(fs, n)) == n[:10]
    assert sorted(os.listdir(C(fs))) == sorted(names)
    r = sh("echo x > %s" % q(C(fs, "m" * 256)), check=False)
    assert r.returncode != 0 and "too long" in r.stderr.lower()
    etcd.put("/config/from etcd/ü", "v")
    wait_for(lambda: os.path.exists(C(fs, "from etcd", "ü")), 5, what="utf-8 name from etcd")


def test_dotdot_and_empty_parts_never_reach_etcd(etcd, fs):
    sh("mkdir %s" % q(C(fs, "a")))
    sh("echo v > %s" % q(C(fs, "a", "..", "b")))
    sh("echo w > %s" % (q(C(fs, "a")) + "//c"))
    assert etcd.get_prefix("/config/") == {"/config/b": "v\n", "/config/a/c": "w\n"}
    # keys that cannot be file names are left out and counted in /status
    for k in ["/config/x/../y", "/config/x//y", "/config/..", "/config/.", "/config/t/", "/config/z/.value"]:
        etcd.put(k, "bad")
    etcd.put("/config/good", "g")
    wait_for(lambda: os.path.exists(C(fs, "good")), 5, what="good key")
    assert sorted(os.listdir(C(fs))) == ["a", "b", "good"]
    st = json.loads(read(os.path.join(fs.path, "status")))
    assert st["skipped_keys"] == 6


def test_read_only_mount(etcd, coordfs_mount):
    etcd.put("/config/k", "v")
    m = coordfs_mount(etcd, "-o", "ro")
    assert read(C(m, "k")) == "v"
    with pytest.raises(OSError) as e:
        open(C(m, "k"), "w")
    assert e.value.errno == errno.EROFS
    assert etcd.get("/config/k") == "v"


def test_uid_gid_umask_options(etcd, coordfs_mount):
    etcd.put("/config/d/k", "v")
    m = coordfs_mount(etcd, "-o", "uid=1234,gid=4321,umask=027")
    st = os.stat(C(m, "d", "k"))
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert st.st_mode & 0o777 == 0o640
    assert os.stat(C(m, "d")).st_mode & 0o777 == 0o750
    m2 = coordfs_mount(etcd)
    assert os.stat(C(m2, "d", "k")).st_mode & 0o777 == 0o644


def test_write_while_etcd_down_eio_nothing_stored(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "--timeout", "2s")
    sh("echo before > %s" % q(C(m, "k")))
    etcd.stop(0)
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        with open(C(m, "k"), "w") as f:
            f.write("during")
    took = time.monotonic() - t0
    assert e.value.errno == errno.EIO
    assert took < 15, took
    etcd.start_member(0)
    assert etcd.get("/config/k") == "before\n"


def test_two_mounts_see_each_others_writes(etcd, coordfs_mount):
    a, b = coordfs_mount(etcd), coordfs_mount(etcd)
    sh("echo 1 > %s" % q(C(a, "k")))
    wait_for(lambda: os.path.exists(C(b, "k")) and read(C(b, "k")) == "1\n", 5, what="b sees a's write")
    done = threading.Event()

    def writer():
        for i in range(20):
            with open(C(a, "k"), "w") as f:
                f.write("n%d" % i)
        done.set()

    writer()
    wait_for(lambda: read(C(b, "k")) == "n19", 5, what="b sees the last write")


def test_new_key_from_etcdctl_read_at_once(etcd, fs):
    for i in range(10):
        etcd.put("/config/fresh%d" % i, "v%d" % i)
        assert sh("cat %s" % q(C(fs, "fresh%d" % i))).stdout == "v%d" % i
    etcd.put("/config/deep/er/key", "d")
    assert read(C(fs, "deep", "er", "key")) == "d"


def test_file_that_becomes_a_directory(etcd, fs):
    sh("echo '{\"port\": 8080}' > %s" % q(C(fs, "app")))
    assert os.path.isfile(C(fs, "app"))
    etcd.put("/config/app/db", "postgres://db:5432")
    # the kernel's cached entry for app (a file) goes when the event comes
    wait_for(lambda: os.path.isdir(C(fs, "app")), 5, what="app a directory")
    assert sorted(os.listdir(C(fs, "app"))) == [".value", "db"]
    assert read(C(fs, "app", ".value")) == '{"port": 8080}\n'
    etcd.etcdctl("del", "/config/app/db")
    wait_for(lambda: os.path.isfile(C(fs, "app")), 5, what="app a file again")
    assert read(C(fs, "app")) == '{"port": 8080}\n'


def test_etcd_restart_cache_stays_coherent(etcd, fs):
    sh("echo 1 > %s" % q(C(fs, "r")))
    etcd.stop(0)
    etcd.start_member(0)
    etcd.put("/config/r", "2")
    wait_for(lambda: read(C(fs, "r")) == "2", 10, what="change after restart")
    etcd.put("/config/r2", "new")
    wait_for(lambda: "r2" in os.listdir(C(fs)), 10, what="new key after restart")
    sh("echo 3 > %s" % q(C(fs, "r")))
    assert etcd.get("/config/r") == "3\n"


@pytest.mark.cluster
def test_member_failure_mount_keeps_working(etcd_cluster, coordfs_mount):
    m = coordfs_mount(etcd_cluster)
    sh("echo 1 > %s" % q(C(m, "f")))
    with open(os.path.join(m.path, "status")) as f:
        used = json.load(f)["endpoint"]
    etcd_cluster.kill(used)
    etcd_cluster.leader(timeout=15)  # an election may be under way
    with open(C(m, "f"), "w") as f:  # a failed commit would raise here
        f.write("2\n")
    assert etcd_cluster.get("/config/f") == "2\n"
    etcd_cluster.put("/config/f", "3")
    wait_for(lambda: read(C(m, "f")) == "3", 10, what="change seen after failover")
    etcd_cluster.put("/config/g", "new")
    wait_for(lambda: "g" in os.listdir(C(m)), 10, what="new key after failover")


def test_mv_directory_is_one_txn(etcd, fs):
    for k in ("a", "b/c", "b/d"):
        etcd.put("/config/src/" + k, k)
    etcd.put("/config/srcx", "not below src")
    wait_for(lambda: os.path.exists(C(fs, "src", "b", "d")), 5, what="src")
    rev = etcd.revision()
    sh("mv %s %s" % (q(C(fs, "src")), q(C(fs, "dst"))))
    assert etcd.get_prefix("/config/") == {"/config/dst/a": "a", "/config/dst/b/c": "b/c",
                                           "/config/dst/b/d": "b/d", "/config/srcx": "not below src"}
    assert etcd.revision() == rev + 1
    assert sorted(os.listdir(C(fs, "dst", "b"))) == ["c", "d"]
    assert not os.path.exists(C(fs, "src"))
    assert read(C(fs, "dst", "b", "c")) == "b/c"


@pytest.mark.slow
def test_concurrent_load_on_two_mounts_no_hang(etcd, coordfs_mount):
    """Writers, readers, listers and etcdctl on two mounts at once for a few
    seconds: no hang, no error other than a lost race (EBUSY), and at the
    end both mounts read what etcd holds."""
    a, b = coordfs_mount(etcd), coordfs_mount(etcd)
    for m in (a, b):
        os.makedirs(C(m, "load"), exist_ok=True)
    stop = time.monotonic() + 4
    errors = []

    def writer(m, tag):
        i = 0
        while time.monotonic() < stop:
            try:
                with open(C(m, "load", "k%d" % (i % 5)), "w") as f:
                    f.write("%s-%d" % (tag, i))
                with open(C(m, "load", "log"), "a") as f:
                    f.write("%s%d\n" % (tag, i))
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOENT):
                    errors.append(repr(e))
            i += 1

    def reader(m):
        while time.monotonic() < stop:
            try:
                for n in os.listdir(C(m, "load")):
                    with open(C(m, "load", n)) as f:
                        f.read()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(a, "a")), threading.Thread(target=writer, args=(b, "b")),
               threading.Thread(target=reader, args=(a,)), threading.Thread(target=reader, args=(b,))]
    for t in threads:
        t.start()
    while time.monotonic() < stop:
        etcd.put("/config/load/k0", "etcdctl")
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert errors == []
    want = {k[len("/config/load/"):]: v for k, v in etcd.get_prefix("/config/load/").items()}
    for m in (a, b):
        wait_for(lambda: {n: read(C(m, "load", n)) for n in os.listdir(C(m, "load"))} == want, 10,
                 what="mount agrees with etcd")


def test_reads_from_cache_while_etcd_down(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "--timeout", "2s")
    sh("echo cached > %s" % q(C(m, "k")))
    etcd.stop(0)
    t0 = time.monotonic()
    assert read(C(m, "k")) == "cached\n"
    assert sorted(os.listdir(C(m))) == ["k"]
    assert time.monotonic() - t0 < 5
    etcd.start_member(0)


def test_flock_outside_locks_is_refused_not_faked(etcd, coordfs_mount):
    """flock on a /config file is refused with ENOLCK (a distributed lock is
    a file under /locks); it must never pretend to lock."""
    import fcntl
    m = coordfs_mount(etcd)
    path = os.path.join(m.path, "config", "lockme")
    with open(path, "w") as f:
        f.write("x")
    with open(path) as f:
        with pytest.raises(OSError) as e:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert e.value.errno == errno.ENOLCK
