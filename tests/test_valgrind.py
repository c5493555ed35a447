"""test_valgrind.py — the C programs under valgrind memcheck (issue 8.9).

Runs only with COORD_VALGRIND=1 (`make test-valgrind`, which CI runs on the
plain build): each scenario runs a C test program against a real etcd under
`valgrind --leak-check=full`, and fails on any invalid access or definite
leak (valgrind's exit code 99).  gRPC keeps process-wide state alive until
exit ("still reachable"); that is not a leak and is not counted.
"""

import os
import shutil

import pytest

from harness import build_path, run_prog

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
