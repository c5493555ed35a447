"""test_namespaces.py — the container recipes of docs/containers.md without a
container engine: Linux namespaces made with unshare(1) and entered with
nsenter(1), which is what docker, podman and the kubelet do underneath.

  (a) coordfs inside the application's container: one mount + PID namespace
      runs coordfs and the application; the mount is invisible outside, and
      when the namespace's init ends the kernel ends coordfs and the mount.
  (b) a sidecar: coordfs in its own mount + PID namespace mounts on a volume
      with shared propagation (Kubernetes: mountPropagation Bidirectional);
      the application's namespace, made *before* the mount, receives it as a
      slave (HostToContainer).  A third namespace made after the mount gets
      it by a bind mount (docker -v /coord:/coord).
  In each, the application reads config, takes a lock with flock and sees
  inotify events for changes made in etcd.

Needs root (CAP_SYS_ADMIN), unshare and nsenter from util-linux, /dev/fuse.
Every process is ended by the PID this test started; every namespace ends
with its last process, and its mounts with it.
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

import harness
from harness import wait_for

pytestmark = pytest.mark.timeout(180)


def _need():
    if os.geteuid() != 0:
        pytest.skip("needs root for mount namespaces")
    for tool in ("unshare", "nsenter", "flock", "inotifywait"):
        if not shutil.which(tool):
            pytest.skip("%s not installed" % tool)
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    return harness.require_build("coordfs")


def run(argv, timeout=30, check=True, env=None):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       stdin=subprocess.DEVNULL, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError("%s: exit %s\n%s" % (" ".join(argv), r.returncode, r.stdout))
    return r


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Ns:
    """A process started in new namespaces by unshare; .pid is unshare's,
    .inner the PID (seen from here) of the process inside (for nsenter)."""

    def __init__(self, argv, log, fork=True):
        self.log = log
        out = open(log, "ab")
        try:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=harness.prog_env())
        finally:
            out.close()
        self.inner = self.proc.pid
        if fork:  # unshare --fork: the namespace's init is unshare's child
            self.inner = wait_for(lambda: (children(self.proc.pid) or [None])[0], 10,
                                  what="unshare's child")
        # unshare makes the namespace and sets its propagation after it has
        # started, and only then execs the command: an nsenter before that
        # would mount in this test's own namespace, or have its shared mount
        # made private again (CI once lost the node's shared volume so: the
        # bind mount went to the host namespace).  Wait for the exec.
        own = os.readlink("/proc/self/ns/mnt")
        wait_for(lambda: self._proc("comm") not in (None, "unshare\n", "nsenter\n") and
                 self._proc("ns/mnt") not in (None, own), 10, what="the namespace's command started")

    def _proc(self, what):
        try:
            if what.startswith("ns/"):
                return os.readlink("/proc/%d/%s" % (self.inner, what))
            with open("/proc/%d/%s" % (self.inner, what)) as f:
                return f.read()
        except OSError:
            return None

    def enter(self, *cmd, timeout=30, check=True, mount=True, pid=True):
        argv = ["nsenter", "-t", str(self.inner)] + (["-m"] if mount else []) + (["-p"] if pid else []) + \
            ["--"] + list(cmd)
        return run(argv, timeout=timeout, check=check)

    def popen(self, *cmd, **kw):
        argv = ["nsenter", "-t", str(self.inner), "-m", "-p", "--"] + list(cmd)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kw)

    def mounts(self):
        try:
            with open("/proc/%d/mountinfo" % self.inner) as f:
                return [(l.split()[4], l.split(" - ")[1].split()[0]) for l in f]
        except OSError:
            return []

    def has_mount(self, path, fstype="fuse.coordfs"):
        return (path, fstype) in self.mounts()

    def stop(self, sig=signal.SIGTERM):
        harness.end_process(self.proc, sig, 10)

    def logtext(self):
        return harness.tail(self.log, 60)


def app_checks(ns, coord, etcd, tag):
    """What an application does with /coord, run inside its namespace."""
    # config
    out = ns.enter("cat", coord + "/config/app/greeting").stdout
    assert out == "hello from etcd", out
    # a lock, visible in etcd while held, gone after
    holder = ns.popen("flock", coord + "/locks/ns-" + tag, "-c", "echo held; sleep 30")
    try:
        wait_for(lambda: etcd.get_prefix("/locks/ns-%s/" % tag), 15, interval=0.1, what="lock key in etcd")
        r = ns.enter("flock", "-n", coord + "/locks/ns-" + tag, "true", check=False)
        assert r.returncode != 0, "second flock -n got a held lock"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=10)
    wait_for(lambda: not etcd.get_prefix("/locks/ns-%s/" % tag), 15, interval=0.1, what="lock released")
    # inotify: a change made in etcd wakes a watcher inside the namespace
    w = ns.popen("inotifywait", "-t", "20", "-e", "modify,close_write,attrib",
                 coord + "/config/app/greeting")
    try:
        time.sleep(0.5)  # let inotifywait set its watch
        n = 0
        while w.poll() is None and n < 20:
            n += 1
            etcd.put("/config/app/greeting", "changed %s %d" % (tag, n))
            time.sleep(0.5)
        out = w.communicate(timeout=25)[0]
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
            w.communicate(timeout=10)
    assert w.returncode == 0 and ("MODIFY" in out or "CLOSE_WRITE" in out or "ATTRIB" in out), out
    assert ns.enter("cat", coord + "/config/app/greeting").stdout.startswith("changed %s" % tag)
    etcd.put("/config/app/greeting", "hello from etcd")


def test_coordfs_inside_the_application_namespace(etcd, tmp_path):
    """Recipe (a): coordfs and the application share one container."""
    coordfs = _need()
    etcd.put("/config/app/greeting", "hello from etcd")
    coord = str(tmp_path / "coord")
    os.makedirs(coord)
    ns = Ns(["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
             "sleep", "600"], str(tmp_path / "ns.log"))
    fs = None
    try:
        fs = ns.popen(coordfs, "-f", "--endpoints", etcd.endpoints, coord)
        wait_for(lambda: ns.has_mount(coord) or fs.poll() is not None, 20, what="coordfs mounted in the ns")
        assert fs.poll() is None, fs.communicate()[0]
        assert not harness.mounted(coord), "the container's mount leaked to the host"
        # inside, coordfs is a small PID
        ps = ns.enter("sh", "-c", "ls /proc | grep -c '^[0-9]'").stdout
        assert int(ps) < 20, ps
        app_checks(ns, coord, etcd, "a")
    finally:
        ns.stop(signal.SIGKILL)  # the namespace's init: the kernel ends everything inside
        if fs is not None:
            try:
                fs.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(fs.pid, signal.SIGKILL)
                fs.communicate(timeout=10)
    assert not harness.mounted(coord)


def test_sidecar_shares_the_mount_by_propagation_and_bind(etcd, tmp_path):
    """Recipe (b): coordfs in a sidecar, the mount shared with the app."""
    coordfs = _need()
    etcd.put("/config/app/greeting", "hello from etcd")
    vol = str(tmp_path / "volume")  # the pod's shared volume (emptyDir)
    appvol = str(tmp_path / "app-volume")  # where the app container sees it
    late = str(tmp_path / "late-coord")  # a container started after the mount
    for d in (vol, appvol, late):
        os.makedirs(d)
    coord = vol + "/coord"
    os.makedirs(coord)
    # the "node": a private mount namespace in which the volume is shared
    node = Ns(["unshare", "--mount", "--propagation", "private", "sleep", "600"], str(tmp_path / "node.log"),
              fork=False)
    app = side = late_ns = None
    try:
        node.enter("sh", "-c", "mount --bind %s %s && mount --make-shared %s" % (vol, vol, vol), pid=False)
        # the application container, created before coordfs mounts:
        # the volume bound at its own path, as a slave (HostToContainer)
        app = Ns(["nsenter", "-t", str(node.inner), "-m", "--", "unshare", "--mount", "--pid", "--fork", "--kill-child",
                  "--propagation", "unchanged", "sh", "-c",
                  "mount --rbind %s %s && mount --make-rslave %s && exec sleep 600" % (vol, appvol, appvol)],
                 str(tmp_path / "app.log"))
        wait_for(lambda: any(m[0] == appvol for m in app.mounts()), 10, what="app volume")
        assert not app.has_mount(appvol + "/coord")
        # the sidecar: coordfs in its own mount + PID namespace, mounting on the shared volume
        side = Ns(["nsenter", "-t", str(node.inner), "-m", "--", "unshare", "--mount", "--pid", "--fork", "--kill-child",
                   "--propagation", "unchanged", coordfs, "-f", "--endpoints", etcd.endpoints, coord],
                  str(tmp_path / "sidecar.log"))
        wait_for(lambda: side.has_mount(coord) or side.proc.poll() is not None, 20, what="sidecar mounted")
        assert side.proc.poll() is None, side.logtext()
        # propagation: the node and the app namespace see it; the host does not
        wait_for(lambda: node.has_mount(coord), 10, what="mount propagated to the node")
        wait_for(lambda: app.has_mount(appvol + "/coord"), 10, what="mount propagated to the app")
        assert not harness.mounted(coord)
        app_checks(app, appvol + "/coord", etcd, "prop")

        # a container created later gets the mount by a bind mount
        late_ns = Ns(["nsenter", "-t", str(node.inner), "-m", "--", "unshare", "--mount", "--pid", "--fork", "--kill-child",
                      "--propagation", "unchanged", "sh", "-c",
                      "mount --bind %s %s && exec sleep 600" % (coord, late)], str(tmp_path / "late.log"))
        wait_for(lambda: late_ns.has_mount(late), 10, what="bind mount in the late container")
        app_checks(late_ns, late, etcd, "bind")
    finally:
        for ns in (late_ns, app):
            if ns:
                ns.stop(signal.SIGKILL)
        if side:
            if side.proc.poll() is None:
                try:
                    os.kill(side.inner, signal.SIGTERM)  # coordfs (the sidecar's init) unmounts on SIGTERM
                    side.proc.wait(15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            side.stop(signal.SIGKILL)  # --kill-child: its init goes with it
        # whatever is left mounted in the node namespace goes with it
        if node.proc.poll() is None and node.has_mount(coord):
            node.enter("umount", "-l", coord, check=False, pid=False)
        node.stop(signal.SIGKILL)
    assert not harness.mounted(coord)


def test_entrypoint_recipe_in_a_fresh_container(etcd, tmp_path):
    """packaging/docker/coord-entrypoint as PID 1 of a new mount + PID
    namespace: mounts coordfs, runs the app through coord-env; when the app
    ends, the namespace ends and takes coordfs and the mount along."""
    coordfs = _need()
    etcd.put("/config/app/greeting", "hello from etcd")
    etcd.put("/config/app/db/host", "db1")
    coord = str(tmp_path / "coord")
    entry = os.path.join(harness.REPO, "packaging/docker/coord-entrypoint")
    env = harness.prog_env(dict(os.environ, COORD_MOUNT=coord, COORD_ENDPOINTS=etcd.endpoints, COORD_APP="app",
                                COORDFS_OPTS="--lock-ttl=5s",
                                PATH="%s:%s:%s" % (os.path.dirname(coordfs), os.path.join(harness.REPO, "examples"),
                                                   os.environ.get("PATH", "/usr/bin:/bin"))))
    r = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation",
                        "private", "sh", entry, "sh", "-c",
                        'echo "pid=$$ $GREETING $DB_HOST"; flock -n %s/locks/entry -c "echo locked"' % coord],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 0, r.stdout
    assert "pid=1 hello from etcd db1" in r.stdout, r.stdout  # the app is the container's init
    assert "locked" in r.stdout, r.stdout
    assert not harness.mounted(coord)
    wait_for(lambda: not etcd.get_prefix("/locks/entry/"), 10, interval=0.1, what="lock gone with the container")


def test_kubernetes_manifests_match_the_recipes():
    """The manifests in packaging/k8s parse, and say what the tested
    namespaces do: sidecar Bidirectional, application HostToContainer, the
    same volume, commands that exist."""
    yaml = pytest.importorskip("yaml")
    k8s = os.path.join(harness.REPO, "packaging/k8s")
    docs = list(yaml.safe_load_all(open(os.path.join(k8s, "coordfs-sidecar.yaml"))))
    pod = [d for d in docs if d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]
    side = pod["initContainers"][0]
    app = pod["containers"][0]
    assert side["restartPolicy"] == "Always" and side["securityContext"]["privileged"] is True
    (sm,) = side["volumeMounts"]
    (am,) = app["volumeMounts"]
    assert sm["name"] == am["name"] == pod["volumes"][0]["name"]
    assert sm["mountPropagation"] == "Bidirectional" and am["mountPropagation"] == "HostToContainer"
    mountpoint = side["args"][0]
    assert mountpoint.startswith(sm["mountPath"] + "/")  # inside the volume, not on its root
    app_coord = am["mountPath"] + mountpoint[len(sm["mountPath"]):]
    cmd = app["command"]
    assert cmd[0] == "coord-env" and cmd[cmd.index("-m") + 1] == app_coord
    assert "coord-register" in cmd
    for script in ("coord-env", "coord-register"):
        assert os.access(os.path.join(harness.REPO, "examples", script), os.X_OK)
    (inapp,) = yaml.safe_load_all(open(os.path.join(k8s, "coordfs-in-app.yaml")))
    c = inapp["spec"]["containers"][0]
    assert c["command"] == ["coord-entrypoint"]
    assert "SYS_ADMIN" in c["securityContext"]["capabilities"]["add"]
    assert os.access(os.path.join(harness.REPO, "packaging/docker/coord-entrypoint"), os.X_OK)
