"""conftest.py — pytest fixtures for coord's end-to-end tests.

Fixtures (all function-scoped: each test gets fresh servers; one etcd member
starts in about 0.3 s, a three-member cluster in about 1 s):

  etcd            one etcd member (harness.EtcdCluster of size 1)
  etcd_cluster    three members, for failover tests
  etcd_tls        one member serving TLS and requiring client certificates
  etcd_factory    etcd_factory(size=1, tls=False, extra_args=(...), ...) for
                  anything else; every cluster it made is stopped at the end
  tls_certs       a CA + server + client certificate set (session-wide)
  coordfs_mount   coordfs_mount(etcd, *args) -> harness.CoordfsMount, mounted
                  on a fresh directory; skips the test if coordfs is not built
  build           the build directory (str)

Helpers to import from harness: build_path, require_build, run_prog,
start_prog, finish_prog, end_process, wait_for, mounted, Certs, EtcdCluster.

Every server is stopped by the PID the harness started; when a test fails,
the tail of each etcd log and coordfs log is shown in its report.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import CoordfsMount, EtcdCluster  # noqa: E402

# A hung test (a FUSE deadlock, a lock that never comes) must not eat CI's
# time: pytest-timeout (python3-pytest-timeout), signal method, so teardown
# still runs and unmounts/stops everything.  A test can ask for more with
# @pytest.mark.timeout(N); PYTEST_TIMEOUT in the environment overrides.
os.environ.setdefault("PYTEST_TIMEOUT", "240")


def pytest_sessionstart(session):
    harness.sweep_stale()  # what a killed earlier run left in /dev/shm


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "cluster: needs a three-member etcd cluster")
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (needs pytest-timeout)")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed and rep.when in ("setup", "call"):
        # the servers' side of the story, shown with the failure
        for c in getattr(item, "_coord_clusters", []):
            rep.sections.append(("etcd logs (%s)" % os.path.basename(c.dir), c.log_tails(40)))
        for m in getattr(item, "_coord_mounts", []):
            rep.sections.append(("coordfs log (%s)" % m.path, harness.tail(m.log_path, 60)))


def _track(request, attr, obj):
    """Remember obj on the test item so that a failure report shows its log."""
    lst = getattr(request.node, attr, None)
    if lst is None:
        lst = []
        setattr(request.node, attr, lst)
    lst.append(obj)


def _clusters(request, make):
    made = []

    def factory(**kw):
        c = EtcdCluster(**kw)
        made.append(c)
        _track(request, "_coord_clusters", c)
        c.start()
        return c

    try:
        yield factory if make is None else make(factory)
    finally:
        for c in made:
            c.close()


@pytest.fixture
def etcd_factory(request):
    """etcd_factory(**EtcdCluster kwargs) -> started EtcdCluster."""
    yield from _clusters(request, None)


@pytest.fixture
def etcd(request):
    """One fresh etcd member on 127.0.0.1.  .endpoints, .etcdctl(...), ..."""
    yield from _clusters(request, lambda f: f(size=1, name="etcd1"))


@pytest.fixture
def etcd_cluster(request):
    """Three fresh etcd members.  .members, .leader(), .kill(m), .restart(m) ..."""
    yield from _clusters(request, lambda f: f(size=3, name="etcd3"))


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """harness.Certs: .ca, .server_cert/.server_key, .client_cert/.client_key
    (CN root), .client(cn) for more."""
    return harness.Certs(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def etcd_tls(request, tls_certs):
    """One etcd member serving https with --client-cert-auth; .certs are the
    certificates, .etcdctl() uses them, .coordfs_args() gives coordfs's."""
    yield from _clusters(request, lambda f: f(size=1, tls=True, certs=tls_certs, name="etcdtls"))


@pytest.fixture
def build():
    return harness.build_dir()


@pytest.fixture
def coordfs_mount(request, tmp_path):
    """Factory: coordfs_mount(etcd_or_endpoints, *args, mountpoint=None,
    env=None, check=True, wrap=()) -> CoordfsMount, already mounted (wrap:
    a command line that runs coordfs, such as unshare(1)).

    A cluster object adds its TLS options.  At the end of the test every
    mount is unmounted with fusermount3 -u and coordfs is waited for (killed
    by PID if it hangs); with check=True a sanitizer report in coordfs's log
    fails the test.  Skips the test if coordfs was not built."""
    binary = harness.build_path("coordfs")
    if not harness.have_build("coordfs"):
        pytest.skip("coordfs not built: %s" % binary)
    mounts = []
    counter = [0]

    def factory(target, *args, mountpoint=None, env=None, check=True, timeout=None, wrap=()):
        if isinstance(target, EtcdCluster):
            endpoints = target.endpoints
            args = tuple(target.coordfs_args()) + tuple(args)
        else:
            endpoints = target
        counter[0] += 1
        mp = mountpoint or str(tmp_path / ("mnt%d" % counter[0]))
        m = CoordfsMount(mp, endpoints, args, env=env, binary=binary,
                         log_path=str(tmp_path / ("coordfs%d.log" % counter[0])))
        m.argv = list(wrap) + m.argv  # e.g. unshare(1): coordfs in a namespace of its own
        m.check_on_exit = check
        mounts.append(m)
        _track(request, "_coord_mounts", m)
        m.start(timeout)
        return m

    yield factory

    errors = []
    for m in reversed(mounts):  # the last mounted may sit on top of an earlier one
        try:
            m.unmount()
        except Exception as e:  # keep going: every mount must go
            errors.append("unmount %s: %s" % (m.path, e))
        if m.check_on_exit:
            rep = harness.sanitizer_report(m.log())
            if rep:
                errors.append("coordfs %s sanitizer report:\n%s" % (m.path, rep))
    if errors:
        pytest.fail("\n".join(errors))
