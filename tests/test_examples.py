"""test_examples.py — the example programs in libcoord/examples/ run against
a real etcd and exit 0.

Each example takes its endpoints from COORD_ENDPOINTS (set by run_prog to
the test's etcd).  The gRPC echo examples need a registry-fed resolver and
are tested with the resolver; this file covers the standalone ones.
"""

import json

import pytest

from harness import require_build, run_prog


def run_example(etcd, name):
    require_build("examples/" + name)
    return run_prog("examples/" + name, endpoints=etcd, timeout=60)


def test_example_config(etcd):
    out = run_example(etcd, "config")
    assert "db at db.internal:5432" in out
    assert "unpack with a wrong format: bad value format" in out
    assert "event: PUT example/db/port = 6543" in out
    # it cleans up after itself
    assert etcd.get_prefix("/config/") == {}


def test_example_registry(etcd):
    out = run_example(etcd, "registry")
    assert "registered example-echo/echo-1" in out
    assert "event: PUT example-echo/echo-2" in out
    assert "event: DELETE example-echo/echo-2" in out
    assert etcd.get_prefix("/services/") == {}


def test_example_registry_sees_other_instances(etcd):
    etcd.put("/services/example-echo/elsewhere", json.dumps({"address": "10.1.2.3", "port": 9}))
    out = run_example(etcd, "registry")
    assert "discovered 2 instance(s)" in out
    assert "example-echo/elsewhere 10.1.2.3:9" in out


@pytest.mark.parametrize("name", ["lock"])
def test_other_standalone_examples(etcd, name):
    run_example(etcd, name)
