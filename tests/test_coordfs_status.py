"""test_coordfs_status.py — /status: JSON with endpoints, connection state,
cluster id, leader, revision and counters; the tree's top level."""

import json
import os

import pytest

from harness import wait_for


@pytest.fixture
def fs(etcd, coordfs_mount):
    return coordfs_mount(etcd)


def status(m):
    with open(os.path.join(m.path, "status")) as f:
        return json.load(f)


def test_status_fields(etcd, fs):
    st = status(fs)
    es = etcd.status()
    assert st["endpoints"] == etcd.endpoints
    assert st["connected"] is True and st["state"] == "connected"
    assert int(st["cluster_id"], 16) == int(es["header"]["cluster_id"])
    assert int(st["leader"], 16) == int(es["leader"])
    for k in ("ops", "cache_hits", "events", "errors", "commits", "conflicts", "skipped_keys"):
        assert isinstance(st["counters"][k], int), k
    etcd.put("/config/x", "1")
    rev = etcd.revision()
    with open(os.path.join(fs.path, "config", "x")) as f:
        f.read()
    st2 = status(fs)
    assert st2["revision"] >= rev
    assert st2["counters"]["ops"] > st["counters"]["ops"]
    assert st2["counters"]["cache_hits"] > st["counters"]["cache_hits"]
    assert st2["counters"]["events"] >= 1


def test_status_when_etcd_down(etcd, fs):
    etcd.stop(0)
    st = status(fs)
    assert st["connected"] is False
    etcd.start_member(0)


def test_top_level(fs):
    assert sorted(os.listdir(fs.path)) == ["config", "events", "locks", "services", "status"]
    assert sorted(os.listdir(os.path.join(fs.path, "events"))) == ["config", "locks", "services"]
    with pytest.raises(OSError):
        open(os.path.join(fs.path, "status"), "w")


# ---------------------------------------------------------------- issue 13: which keys are skipped

def skip_lines(m, key):
    return [l for l in m.log().splitlines() if "key %s cannot be shown as a file" % key in l]


def test_skipped_keys_are_listed_and_logged_once(etcd, coordfs_mount):
    long_name = "l" * 300
    # before the mount: seen by the initial load
    etcd.put("/config/a//b", "1")
    etcd.put("/config/./x", "2")
    etcd.put("/services/chat//c1", "{}")
    m = coordfs_mount(etcd)
    # after it: seen by the watch
    etcd.put("/config/x/..", "3")
    etcd.put("/config/d/.value", "4")
    etcd.put("/config/" + long_name, "5")
    etcd.put("/config/ok", "fine")
    wait_for(lambda: os.path.exists(os.path.join(m.path, "config", "ok")), 5, what="ok")
    # later changes of a skipped key are not logged again
    etcd.put("/config/a//b", "again")
    etcd.put("/config/x/..", "again")
    etcd.put("/config/ok", "fine2")
    wait_for(lambda: open(os.path.join(m.path, "config", "ok")).read() == "fine2", 5, what="ok rewritten")
    st = status(m)
    want = sorted(["/config/a//b", "/config/./x", "/services/chat//c1", "/config/x/..", "/config/d/.value",
                   "/config/" + long_name])
    assert st["skipped"] == want
    assert st["skipped_keys"] == len(want) and st["counters"]["skipped_keys"] == len(want)
    for k, why in [("/config/a//b", "empty path component"), ("/config/./x", "'.' or '..'"),
                   ("/services/chat//c1", "empty path component"), ("/config/x/..", "'.' or '..'"),
                   ("/config/d/.value", "'.value'"), ("/config/" + long_name, "longer than 255 bytes")]:
        lines = skip_lines(m, k)
        assert len(lines) == 1, (k, lines)
        assert why in lines[0] and "warning" in lines[0], lines[0]
    # a deleted one leaves the list
    etcd.etcdctl("del", "/config/a//b")
    wait_for(lambda: "/config/a//b" not in status(m)["skipped"], 5, what="deleted from the list")
    assert status(m)["skipped_keys"] == len(want) - 1


def test_skipped_list_is_capped_count_exact(etcd, coordfs_mount):
    m = coordfs_mount(etcd)
    for batch in range(2):  # 150 keys in two transactions (etcd allows 128 operations in one)
        ops = "".join("put /config/many//k%03d v\n" % i for i in range(batch * 75, batch * 75 + 75))
        etcd.etcdctl("txn", input="\n" + ops + "\n\n")
    wait_for(lambda: status(m)["skipped_keys"] == 150, 10, what="150 skipped keys")
    st = status(m)
    assert len(st["skipped"]) == 100
    assert st["skipped"] == ["/config/many//k%03d" % i for i in range(100)]
    assert len([l for l in m.log().splitlines() if "cannot be shown as a file" in l]) == 150
