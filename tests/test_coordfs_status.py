"""test_coordfs_status.py — /status: JSON with endpoints, connection state,
cluster id, leader, revision and counters; the tree's top level."""

import json
import os

import pytest


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
