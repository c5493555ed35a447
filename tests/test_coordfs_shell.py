"""test_coordfs_shell.py — /config driven by the tools people use: bash
redirections (bash ignores the errors of close()), cp -p, tar, dd, chmod,
chown, touch.  Each test here failed on coordfs before issue 13.

- A write that cannot be committed fails where the shell sees it: the open
  (etcd frozen or down: EIO; a role that may not write the key: EACCES),
  so `set -e` stops and nothing reaches etcd.
- Appends (`>>`) from two shells lose no line: they are committed as
  compare-and-retry appends.
- A value written and then given times or a mode before close (cp -p,
  tar x) reads back whole at once.
- A commit whose answer did not come in time reports ETIMEDOUT (outcome
  unknown), not EIO (nothing written).
- chmod and chown that would change something fail with EPERM (nothing
  stores them); a no-op succeeds; times are kept on the mount.
"""

import errno
import os
import stat
import subprocess
import time

import pytest

import harness
from harness import wait_for

SLOW = 3.0 if harness.SANITIZE else 1.0


def sh(cmd, env=None, timeout=120):
    return subprocess.run(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))


def ok(cmd, env=None):
    r = sh(cmd, env)
    assert r.returncode == 0, "%s: exit %d\n%s%s" % (cmd, r.returncode, r.stdout, r.stderr)
    return r.stdout


def version(etcd, key):
    r = etcd.etcdctl_json("get", key)
    return int(r["kvs"][0]["version"]) if r.get("kvs") else 0


# ------------------------------------------------------------------ 1. etcd frozen or down

@pytest.mark.timeout(120)
def test_bash_write_fails_at_open_while_etcd_is_frozen(etcd, coordfs_mount):
    """`echo v > f` with etcd frozen used to exit 0 after seconds with
    nothing written (the commit failed in close(), which bash ignores).
    Now the open asks etcd first: bash reports the error, set -e stops,
    and nothing is written, then or after etcd resumes."""
    m = coordfs_mount(etcd, "--timeout=1s")
    F = {"F": m.join("config", "frozen"), "G": m.join("config", "kept")}
    ok('echo old > "$G"', F)
    etcd.pause(etcd.members[0])
    try:
        r = sh('set -e; echo new > "$F"; echo written', F)
        r2 = sh('set -e; echo new >> "$G"; echo written', F)
        r3 = sh('set -e; echo new > "$G"; echo written', F)
    finally:
        etcd.resume(etcd.members[0])
    for x in (r, r2, r3):
        assert x.returncode != 0 and "written" not in x.stdout, (x.stdout, x.stderr)
        assert "Input/output error" in x.stderr, x.stderr
    time.sleep(1.0)  # a late apply would show now
    assert etcd.get("/config/frozen") is None
    assert etcd.get("/config/kept") == "old\n"
    assert open(F["G"]).read() == "old\n"


@pytest.mark.timeout(120)
def test_bash_write_fails_at_open_while_etcd_is_down(etcd, coordfs_mount):
    m = coordfs_mount(etcd, "--timeout=1s")
    F = {"F": m.join("config", "down")}
    ok('echo before > "$F"', F)
    etcd.stop(etcd.members[0])
    try:
        r = sh('set -e; echo after > "$F"; echo written', F)
    finally:
        etcd.start_member(etcd.members[0])
    assert r.returncode != 0 and "written" not in r.stdout, (r.stdout, r.stderr)
    assert "Input/output error" in r.stderr, r.stderr
    assert etcd.get("/config/down") == "before\n"
    wait_for(lambda: sh('echo again > "$F"', F).returncode == 0, 20 * SLOW, 0.2, "writes after the restart")
    assert etcd.get("/config/down") == "again\n"


# ------------------------------------------------------------------ 2. no permission

@pytest.mark.timeout(120)
def test_bash_write_without_permission_fails_at_open(etcd, coordfs_mount, tmp_path):
    """A role that may write only /config/app/ (no --subtree): `echo no >
    config/other` exited 0 while etcd refused the Put.  Now bash sees
    EACCES at the open; writes the role allows still work."""
    from test_security import auth_setup
    m = coordfs_mount(etcd, "--user", "alice", "--password-file", auth_setup(etcd, tmp_path))
    F = {"O": m.join("config", "other"), "N": m.join("config", "new"), "A": m.join("config", "app", "x")}
    for cmd in ('echo no > "$O"', 'echo no >> "$O"', 'echo no > "$N"', 'cp /etc/hostname "$N"'):
        r = sh("set -e; %s; echo written" % cmd, F)
        assert r.returncode != 0 and "written" not in r.stdout, (cmd, r.stdout, r.stderr)
        assert "Permission denied" in r.stderr, (cmd, r.stderr)
    assert etcd.get("/config/other") == "2" and etcd.get("/config/new") is None
    ok('echo yes > "$A"', F)
    assert etcd.get("/config/app/x") == "yes\n"


# ------------------------------------------------------------------ 3. appends

@pytest.mark.parametrize("exists", [True, False], ids=["existing", "new"])
def test_two_shells_appending_lose_no_line(etcd, coordfs_mount, exists):
    """Two shells appending 100 lines each with `>>`: 123 of 200 survived,
    the losers' closes failed with EBUSY unseen.  Appends now retry on top
    of the other writer's value: every line is there, each writer's in its
    order."""
    m = coordfs_mount(etcd)
    F = {"F": m.join("config", "log")}
    if exists:
        ok('echo start > "$F"', F)
    p1 = harness._popen(["bash", "-c", 'for i in $(seq 100); do echo a$i >> "$F"; done'],
                        env=dict(os.environ, **F), stderr=subprocess.PIPE, text=True)
    p2 = harness._popen(["bash", "-c", 'for i in $(seq 100); do echo b$i >> "$F"; done'],
                        env=dict(os.environ, **F), stderr=subprocess.PIPE, text=True)
    for p in (p1, p2):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and not err, err
    lines = etcd.get("/config/log").splitlines()
    if exists:
        assert lines[0] == "start"
        lines = lines[1:]
    assert sorted(lines) == sorted(["a%d" % i for i in range(1, 101)] + ["b%d" % i for i in range(1, 101)])
    for w in "ab":
        mine = [l for l in lines if l[0] == w]
        assert mine == ["%s%d" % (w, i) for i in range(1, 101)]
    assert open(F["F"]).read().splitlines()[-len(lines):] == lines


def test_append_to_a_value_changed_elsewhere_keeps_both(etcd, coordfs_mount):
    """exec 3>>f; another client writes f; echo x >&3; close: the line goes
    after the other client's value (an append appends), nothing is lost."""
    m = coordfs_mount(etcd)
    F = {"F": m.join("config", "app")}
    ok('echo one > "$F"', F)
    p = harness._popen(["bash", "-c", 'exec 3>>"$F"; read go; echo three >&3; exec 3>&-; echo done'],
                       env=dict(os.environ, **F), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.exists("/proc/%d" % p.pid), 5)
    time.sleep(0.3)
    etcd.put("/config/app", "one\ntwo\n")
    out, _ = p.communicate("go\n", timeout=60)
    assert p.returncode == 0 and out == "done\n"
    assert etcd.get("/config/app") == "one\ntwo\nthree\n"


def test_append_that_no_longer_fits_after_another_writer_fails_with_efbig(etcd, coordfs_mount, tmp_path):
    """An append placed after another writer's value must still fit etcd's
    request limit: if it does not, the close fails with EFBIG and etcd
    keeps the other writer's value (nothing half-written)."""
    m = coordfs_mount(etcd)
    p = m.join("config", "big")
    big = "a" * (1024 * 1024)
    etcd.etcdctl("put", "/config/big", input=big)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"b" * (400 * 1024))  # 1.4 MiB in all: fits
    theirs = "c" * (1400 * 1024)
    etcd.etcdctl("put", "/config/big", input=theirs)  # now the append would not
    with pytest.raises(OSError) as ei:
        os.close(fd)
    assert ei.value.errno == errno.EFBIG
    assert etcd.get("/config/big") == theirs


# ------------------------------------------------------------------ 4. sizes while writing

def test_cp_p_over_a_shorter_value_reads_back_whole(etcd, coordfs_mount, tmp_path):
    """cp -p writes, then sets times and mode before close (fstat, fchmod,
    futimens): the kernel was told the old size in between and the next
    cat read the new value cut to the old length (22 runs in 30)."""
    m = coordfs_mount(etcd)
    F = {"F": m.join("config", "k"), "S": str(tmp_path / "src")}
    for i in range(30):
        val = "v%d-" % i + "x" * (20 + i)
        (tmp_path / "src").write_text(val + "\n")
        os.chmod(F["S"], 0o644)
        ok('echo short > "$F"', F)
        assert ok('cp -p "$S" "$F" && cat "$F"', F) == val + "\n", i
    assert etcd.get("/config/k") == val + "\n"
    assert int(os.stat(m.join("config", "k")).st_mtime) == int(os.stat(F["S"]).st_mtime)


def test_tar_x_files_read_back_at_once(etcd, coordfs_mount, tmp_path):
    """tar x of new files, then over shorter values: every file reads back
    whole right after tar returns (new files used to read empty)."""
    m = coordfs_mount(etcd)
    src = tmp_path / "src" / "t"
    src.mkdir(parents=True)
    want = {}
    for i in range(100):
        want["f%d" % i] = "file %d %s\n" % (i, "y" * (i % 13))
        (src / ("f%d" % i)).write_text(want["f%d" % i])
        os.chmod(str(src / ("f%d" % i)), 0o644)
    os.utime(str(src / "f7"), (1500000000, 1500000000))
    ok('tar cf "$T" -C "$S" t', {"T": str(tmp_path / "t.tar"), "S": str(tmp_path / "src")})
    env = {"T": str(tmp_path / "t.tar"), "M": m.join("config")}
    for round_ in range(2):
        if round_:
            ok('for f in "$M"/t/*; do echo s > "$f"; done', env)
        ok('tar xf "$T" -C "$M"', env)
        got = {k: open(m.join("config", "t", k)).read() for k in want}
        assert got == want, round_
        assert int(os.stat(m.join("config", "t", "f7")).st_mtime) == 1500000000
    for k, v in want.items():
        assert etcd.get("/config/t/" + k) == v


def test_fstat_while_writing_shows_the_size_written(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    p = m.join("config", "sz")
    with open(p, "w") as f:
        f.write("ab")
    for n in (5, 50, 1, 3000):
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"z" * n)
        assert os.fstat(fd).st_size == n
        assert os.stat(p).st_size == n  # another name lookup, no handle
        os.fchmod(fd, 0o644)
        os.utime(fd, (1, 1))
        os.close(fd)
        assert os.stat(p).st_size == n
        with open(p) as f:
            assert f.read() == "z" * n


# ------------------------------------------------------------------ 5. outcome unknown

@pytest.mark.timeout(120)
def test_commit_without_answer_is_etimedout_not_eio(etcd, coordfs_mount):
    """A commit sent to an etcd that froze before answering may still be
    applied when it resumes.  It used to fail with EIO ("not written") and
    then appear.  Now: ETIMEDOUT (outcome unknown).  (Only close() shows
    it, so Python: bash would not.)"""
    m = coordfs_mount(etcd, "--timeout=1s")
    p = m.join("config", "unsure")
    with open(p, "w") as f:
        f.write("v0")
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"v1")
    etcd.pause(etcd.members[0])
    try:
        with pytest.raises(OSError) as ei:
            os.close(fd)
    finally:
        etcd.resume(etcd.members[0])
    assert ei.value.errno == errno.ETIMEDOUT, ei.value
    wait_for(lambda: etcd.get("/config/unsure") in ("v0", "v1"), 10)
    # the file still reads as what etcd holds, whichever it is
    wait_for(lambda: open(p).read() == etcd.get("/config/unsure"), 10, what="mount agrees with etcd")


# ------------------------------------------------------------------ 7. chmod, chown, touch

def test_chmod_chown_fail_unless_no_op_and_times_are_kept(etcd, coordfs_mount, tmp_path):
    m = coordfs_mount(etcd)
    F = {"F": m.join("config", "attrs"), "D": m.join("config", "dir")}
    ok('echo v > "$F"; mkdir "$D"', F)
    mode = stat.S_IMODE(os.stat(F["F"]).st_mode)
    r = sh('chmod 600 "$F"', F)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    assert stat.S_IMODE(os.stat(F["F"]).st_mode) == mode
    ok('chmod %o "$F"' % mode, F)  # no change: fine
    r = sh('chmod 700 "$D"', F)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    uid, gid = os.stat(F["F"]).st_uid, os.stat(F["F"]).st_gid
    r = sh('chown %d "$F"' % (uid + 1234), F)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    r = sh('chgrp %d "$F"' % (gid + 1234), F)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    ok('chown %d:%d "$F"' % (uid, gid), F)
    # times are kept (on this mount, until the key changes)
    ok('touch -d "2020-02-03 04:05:06 UTC" "$F"', F)
    assert int(os.stat(F["F"]).st_mtime) == 1580702706
    ok('touch -a -d "2021-01-01 00:00:00 UTC" "$F"', F)
    st = os.stat(F["F"])
    assert int(st.st_atime) == 1609459200 and int(st.st_mtime) == 1580702706
    ok('touch -d "2019-01-01 00:00:00 UTC" "$D"', F)
    assert int(os.stat(F["D"]).st_mtime) == 1546300800
    assert etcd.get("/config/attrs") == "v\n"  # nothing written by any of it
    etcd.put("/config/attrs", "w")  # a change: the mtime is when this mount saw it
    wait_for(lambda: os.stat(F["F"]).st_mtime > time.time() - 60, 10, what="new mtime")
    # elsewhere nothing keeps times: only a no-op succeeds
    r = sh('touch -d "2020-01-01" "$L"', {"L": m.join("status")})
    assert r.returncode != 0


# ------------------------------------------------------------------ editors: mount-local names

@pytest.mark.timeout(120)
def test_vim_edit_is_one_put_and_its_temporary_files_stay_local(etcd, coordfs_mount):
    """An edit with vim used to put its swap file (and more) cluster-wide.
    Now the temporary names (--local-names, editors' by default) stay on
    the mount: the only change etcd sees is the one Put of the file."""
    m = coordfs_mount(etcd)
    other = coordfs_mount(etcd)
    F = {"F": m.join("config", "app.conf"), "D": m.join("config")}
    ok('printf "port=1\\nhost=a\\n" > "$F"', F)
    rev0 = etcd.revision()
    # vim keeps its swap file open while it runs: look at the mount then
    p = harness._popen(["vim", "-u", "NONE", "-i", "NONE", "-N", "-es",
                        "-c", "%s/port=1/port=2/", "-c", "sleep 2", "-c", "wq", F["F"]],
                       env=dict(os.environ, TERM="dumb"), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: os.path.exists(m.join("config", ".app.conf.swp")), 20 * SLOW, what="vim's swap file")
    assert ".app.conf.swp" in os.listdir(m.join("config"))
    assert ".app.conf.swp" not in os.listdir(other.join("config"))
    assert p.wait(60) == 0, p.stderr.read()
    assert etcd.get("/config/app.conf") == "port=2\nhost=a\n"
    assert not os.path.exists(m.join("config", ".app.conf.swp"))
    assert etcd.revision() == rev0 + 1, "vim wrote %d revisions" % (etcd.revision() - rev0)
    assert sorted(os.listdir(other.join("config"))) == ["app.conf"]


def test_local_names_are_files_of_this_mount_only(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    other = coordfs_mount(etcd)
    F = {"D": m.join("config"), "O": other.join("config")}
    ok('echo v > "$D/app"; cp -p "$D/app" "$D/app~"; echo x >> "$D/app~"; mkdir "$D/sub"; echo s > "$D/sub/#a#"', F)
    assert open(m.join("config", "app~")).read() == "v\nx\n"
    assert ok('ls -A "$D"', F).split() == ["app", "app~", "sub"]
    assert ok('ls -A "$O"', F).split() == ["app"]
    assert sorted(etcd.get_prefix("/config/")) == ["/config/app"]
    r = sh('rmdir "$D/sub"', F)
    assert r.returncode != 0 and "not empty" in r.stderr
    ok('chmod 600 "$D/app~" && touch -d @1500000000 "$D/app~"', F)  # kept: a local file is a file
    st = os.stat(m.join("config", "app~"))
    assert stat.S_IMODE(st.st_mode) == 0o600 and int(st.st_mtime) == 1500000000
    ok('mv "$D/app~" "$D/app.bak~" && mv "$D/app.bak~" "$D/restored"', F)  # to a key: mv copies
    assert etcd.get("/config/restored") == "v\nx\n"
    assert not os.path.exists(m.join("config", "app.bak~"))
    ok('rm "$D/sub/#a#" && rmdir "$D/sub"', F)
    # a key whose name is a local name is not shown on this mount
    etcd.put("/config/etcd~", "from etcd")
    time.sleep(0.5)
    assert "etcd~" not in os.listdir(m.join("config"))


def test_local_names_option(etcd, coordfs_mount):
    """--local-names='' turns it off (editors' files are keys again);
    --local-names='*.tmp' keeps only those."""
    m = coordfs_mount(etcd, "-o", "local-names=")
    ok('echo a > "$F"', {"F": m.join("config", "a~")})
    assert etcd.get("/config/a~") == "a\n"
    m2 = coordfs_mount(etcd, "--local-names=*.tmp:x?")
    ok('echo b > "$D/b.tmp"; echo c > "$D/xy"; echo d > "$D/d~"', {"D": m2.join("config")})
    assert etcd.get("/config/b.tmp") is None and etcd.get("/config/xy") is None
    assert etcd.get("/config/d~") == "d\n"


def test_unlinked_local_file_still_reads_through_its_descriptor(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    out = ok('cd "$D"; echo t > x~; exec 4<x~; rm x~; test ! -e x~; cat <&4; exec 4<&-; ls -A', {"D": m.join("config")})
    assert out == "t\n"
