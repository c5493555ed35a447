"""test_config.py — libcoord's configuration centre against a real etcd.

Drives tests/c/config_checks.c (self-checking scenarios) and
tests/c/config_tool.c (a command-line driver), and checks the bytes that
reach etcd with etcdctl: JSON values compact, strings raw, strings that look
like JSON quoted; values written by etcdctl read back as JSON or string; list
and watch_prefix keep to path boundaries (app vs application).
"""

import base64
import json

import pytest

from harness import finish_prog, require_build, run_prog, start_prog


def tool(etcd, *args, expect_rc=0):
    require_build("tests/config_tool")
    return run_prog("tests/config_tool", *args, endpoints=etcd, expect_rc=expect_rc)


def raw(etcd, key):
    """The exact bytes stored at key (None if absent)."""
    r = etcd.etcdctl_json("get", key)
    kvs = r.get("kvs") or []
    return base64.b64decode(kvs[0].get("value", "")) if kvs else None


@pytest.mark.parametrize("scenario", ["roundtrip", "pack", "errors", "list", "watch", "namespace"])
def test_config_scenarios(etcd, scenario):
    require_build("tests/config_checks")
    r = run_prog("tests/config_checks", scenario, endpoints=etcd, check=False, result=True, timeout=120)
    assert r.returncode == 0 and "ok %s" % scenario in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("value,stored", [
    ({"b": [1, 2], "a": {"x": None}}, b'{"b":[1,2],"a":{"x":null}}'),
    ([1, "two", 3.5], b'[1,"two",3.5]'),
    (42, b"42"),
    (-1.25, b"-1.25"),
    (True, b"true"),
    (None, b"null"),
])
def test_json_values_stored_compact(etcd, value, stored):
    tool(etcd, "set", "app/v", json.dumps(value, indent=2))
    assert raw(etcd, "/config/app/v") == stored
    assert json.loads(tool(etcd, "get", "app/v")) == value


@pytest.mark.parametrize("text,stored", [
    ("hello world", b"hello world"),
    ("", b""),
    ("caf\u00e9 \u2603", "caf\u00e9 \u2603".encode()),
    ("postgres://db:5432/x?a=1", b"postgres://db:5432/x?a=1"),
    ("{not json", b"{not json"),
    ("42", b'"42"'),
    ("true", b'"true"'),
    ("null", b'"null"'),
    ('"x"', b'"\\"x\\""'),
    ('{"a":1}', b'"{\\"a\\":1}"'),
])
def test_strings_raw_unless_they_look_like_json(etcd, text, stored):
    tool(etcd, "setstr", "s/v", text)
    assert raw(etcd, "/config/s/v") == stored
    assert json.loads(tool(etcd, "get", "s/v")) == text


def test_values_written_by_etcdctl(etcd):
    etcd.put("/config/ext/obj", '{"k": [1, 2]}')
    etcd.put("/config/ext/num", "17")
    etcd.put("/config/ext/str", "just text")
    etcd.put("/config/ext/quoted", '"17"')
    assert json.loads(tool(etcd, "get", "ext/obj")) == {"k": [1, 2]}
    assert json.loads(tool(etcd, "get", "ext/num")) == 17
    assert json.loads(tool(etcd, "get", "ext/str")) == "just text"
    assert json.loads(tool(etcd, "get", "ext/quoted")) == "17"
    assert json.loads(tool(etcd, "list", "ext")) == {"ext/obj": {"k": [1, 2]}, "ext/num": 17,
                                                     "ext/str": "just text", "ext/quoted": "17"}


def test_nested_keys(etcd):
    tool(etcd, "set", "svc", '{"enabled": true}')
    tool(etcd, "set", "svc/db", '{"host": "h"}')
    tool(etcd, "setstr", "svc/db/password", "s3cret")
    assert etcd.get_prefix("/config/") == {"/config/svc": '{"enabled":true}', "/config/svc/db": '{"host":"h"}',
                                           "/config/svc/db/password": "s3cret"}
    assert json.loads(tool(etcd, "get", "svc/db")) == {"host": "h"}
    tool(etcd, "delete", "svc/db")
    assert "error ENOTFOUND" in tool(etcd, "get", "svc/db", expect_rc=1)
    assert json.loads(tool(etcd, "get", "svc/db/password")) == "s3cret"


def test_list_respects_path_boundaries(etcd):
    for k in ("app", "app/a", "app/a/b", "application", "application/x", "apple", "app-1", "ap"):
        etcd.put("/config/" + k, json.dumps(k))
    assert json.loads(tool(etcd, "list", "app")) == {"app": "app", "app/a": "app/a", "app/a/b": "app/a/b"}
    assert json.loads(tool(etcd, "list", "application")) == {"application": "application",
                                                             "application/x": "application/x"}
    assert json.loads(tool(etcd, "list", "app/a")) == {"app/a": "app/a", "app/a/b": "app/a/b"}
    assert len(json.loads(tool(etcd, "list"))) == 8
    assert json.loads(tool(etcd, "list", "nothing")) == {}


def test_watch_prefix_respects_path_boundaries(etcd):
    require_build("tests/config_tool")
    etcd.put("/config/app/one", "1")
    etcd.put("/config/application/one", "1")
    p = start_prog("tests/config_tool", "watch_prefix", "app", 4, 5000, "current", endpoints=etcd)
    assert p.stdout.readline().strip() == "ready"
    etcd.put("/config/application/two", "2")
    etcd.put("/config/apple", "x")
    etcd.put("/config/app", '{"top": true}')
    etcd.put("/config/app/two", "plain")
    etcd.etcdctl("del", "/config/app/one")
    out, _ = finish_prog(p, timeout=30)
    evs = [json.loads(l) for l in out.splitlines()]
    assert evs == [{"type": "PUT", "name": "app/one", "value": 1},
                   {"type": "PUT", "name": "app", "value": {"top": True}},
                   {"type": "PUT", "name": "app/two", "value": "plain"},
                   {"type": "DELETE", "name": "app/one", "value": None}]


def test_watch_one_key(etcd):
    require_build("tests/config_tool")
    p = start_prog("tests/config_tool", "watch", "feature/x", 2, 5000, endpoints=etcd)
    assert p.stdout.readline().strip() == "ready"
    etcd.put("/config/feature/x/sub", "1")  # below the key: not the key
    etcd.put("/config/feature/xy", "1")
    etcd.put("/config/feature/x", "on")
    etcd.etcdctl("del", "/config/feature/x")
    out, _ = finish_prog(p, timeout=30)
    evs = [json.loads(l) for l in out.splitlines()]
    assert evs == [{"type": "PUT", "name": "feature/x", "value": "on"},
                   {"type": "DELETE", "name": "feature/x", "value": None}]


@pytest.mark.parametrize("key", ["/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", ""])
def test_bad_keys_rejected(etcd, key):
    out = tool(etcd, "set", key, "1", expect_rc=1)
    assert out.startswith("error EINVAL")
    assert etcd.get_prefix("/config") == {}


def test_missing_key(etcd):
    assert tool(etcd, "get", "nope", expect_rc=1).startswith("error ENOTFOUND")
    assert tool(etcd, "delete", "nope", expect_rc=1).startswith("error ENOTFOUND")
