"""test_valgrind.py — the C programs under valgrind memcheck (issue 8.9).

Runs only with COORD_VALGRIND=1 (`make test-valgrind`, which CI runs on the
plain build): each scenario runs a C test program against a real etcd under
`valgrind --leak-check=full`, and fails on any invalid access or definite
leak (valgrind's exit code 99).  gRPC keeps process-wide state alive until
exit ("still reachable"); that is not a leak and is not counted.
"""

import os
import shutil
import time

import pytest

from harness import build_path, run_prog, wait_for

pytestmark = pytest.mark.skipif(os.environ.get("COORD_VALGRIND") != "1" or not shutil.which("valgrind"),
                                reason="valgrind run: make test-valgrind")

VALGRIND = [shutil.which("valgrind") or "/usr/bin/valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite", "--track-fds=no", "-q"]

SCENARIOS = [
    ("core_kv", "basic"),
    ("core_kv", "invalid"),
    ("config_checks", "roundtrip"),
    ("config_checks", "errors"),
    ("config_checks", "list"),
    ("registry_checks", "documents"),
    ("registry_checks", "arguments"),
    ("registry_checks", "lifecycle"),
    ("lock_checks", "t1"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("prog,arg", SCENARIOS, ids=["%s-%s" % s for s in SCENARIOS])
def test_memcheck(etcd, prog, arg):
    path = build_path("tests/" + prog)
    r = run_prog(VALGRIND[0], *(VALGRIND[1:] + [path, arg]), endpoints=etcd, check=False, result=True,
                 timeout=500)
    assert r.returncode != 99, "valgrind found errors:\n" + r.stderr[-6000:]
    assert r.returncode == 0, "exit %s\n%s\n%s" % (r.returncode, r.stdout[-3000:], r.stderr[-3000:])


@pytest.mark.timeout(300)
def test_memcheck_watch(etcd):
    from harness import finish_prog, start_prog
    rev = etcd.revision()
    p = start_prog(VALGRIND[0], *(VALGRIND[1:] + [build_path("tests/core_watch"), "events", "v/", str(rev + 1),
                                                 "v/end", "200000"]), endpoints=etcd)
    for i in range(20):
        etcd.put("v/%d" % i, "x")
    etcd.etcdctl("del", "v/3")
    etcd.put("v/end", "x")
    out, err = finish_prog(p, timeout=250, check=False)
    assert p.returncode == 0, out + err[-4000:]
    assert "DELETE v/3" in out


# What the coordfs scenario does on the mount: every tree, the writes that
# take the commit, conflict and rename paths, a registration held open, a
# lock, and the events and status files.  Each step must succeed.
COORDFS_SCRIPT = r"""
set -e
cd "$1"
echo v1 > config/app
test "$(cat config/app)" = v1
echo more >> config/app
truncate -s 2 config/app
mkdir -p config/d/e
echo x > config/d/e/f
mv config/d config/d2
ls -R config > /dev/null
getfattr -d config/app > /dev/null
cp config/app config/copy
rm config/copy
echo t > 'config/app~'
exec 4< 'config/app~'
rm 'config/app~'
cat <&4 > /dev/null
exec 4<&-
echo keep > config/.keep.swp
touch -d @1500000000 config/app
if chmod 600 config/app 2>/dev/null; then exit 4; fi
rm -r config/d2
if echo '{"bad' > services/web/i1 2>/dev/null; then exit 3; fi
exec 3> services/web/i1
echo '{"address":"127.0.0.1","port":8080}' >&3
test -n "$(cat services/web/i1)"
exec 3>&-
flock locks/deploy true
flock -n locks/deploy true
exec 9> locks/deploy
echo memcheck >&9  # writing takes the lock
if flock -n locks/deploy true; then exit 4; fi
exec 9>&-
head -c 1 status > /dev/null
timeout 60 head -n 1 events/config > /dev/null &
ev=$!
for i in $(seq 100); do  # until head has opened the stream and seen a change
    echo "v$i" > config/app
    kill -0 $ev 2>/dev/null || break
    sleep 0.2
done
wait $ev
"""


@pytest.mark.timeout(600)
def test_memcheck_coordfs(etcd, coordfs_mount):
    """coordfs itself under memcheck: mounted, exercised through every tree
    and by etcdctl changes its watch and notifier apply, unmounted with
    fusermount3 -u; valgrind must find no invalid access and no definite
    leak at exit."""
    import subprocess
    m = coordfs_mount(etcd, check=False, timeout=120, wrap=VALGRIND)
    for i in range(5):
        etcd.put("/config/app%d" % i, "e%d" % i)  # watch events, page invalidation
    subprocess.run(["bash", "-c", COORDFS_SCRIPT, "-", m.path], check=True, timeout=300)
    # a registration deleted behind its back (put back by a thread of its
    # own), rm of it refused, and a key that cannot be shown (/status)
    etcd.put("/config/a//b", "skipped")
    fd = os.open(m.join("services", "web", "i2"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b'{"address":"127.0.0.1","port":8081}')
        etcd.etcdctl("del", "/services/web/i2")
        wait_for(lambda: etcd.get("/services/web/i2") is not None, 60, what="registered again")
        assert subprocess.run(["rm", m.join("services", "web", "i2")], stderr=subprocess.DEVNULL).returncode != 0
    finally:
        os.close(fd)
    wait_for(lambda: "/config/a//b" in open(m.join("status")).read(), 30, what="skipped key listed")
    etcd.etcdctl("del", "--prefix", "/config/a")
    time.sleep(0.5)
    etcd.etcdctl("del", "--prefix", "/config/app")
    code = m.unmount(timeout=120)
    assert code != 99, "valgrind found errors:\n" + m.log()[-8000:]
    assert code == 0, "exit %s\n%s" % (code, m.log()[-4000:])
