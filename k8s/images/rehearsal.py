#!/usr/bin/env python3
"""The deployment rehearsed here: the real images run as a rendered overlay wires them.

No API server is needed. The overlay (default: gke) is rendered with `kubectl
kustomize`; every container then runs under podman exactly as its pod spec says:
image (the overlay's registry name mapped to the local build), command and args,
environment (envFrom the rendered ConfigMap and the Secret, env, secretKeyRef,
fieldRef metadata.name), user and groups (runAsUser, runAsGroup, fsGroup as a
supplementary group), read-only root filesystem (and no tmpfs that the pod does
not declare), dropped capabilities, no-new-privileges, memory and CPU limits and
volumes (emptyDir as a tmpfs, ConfigMaps as read-only files, the store claim as
one directory shared by every pod that mounts it, read-only where the mount says
so). Containers share a podman network on which every Service name resolves to
the containers its selector picks, so `nats://nats:4222` means what it means in
the cluster. Then it is driven as a user would:

  1. NATS (the StatefulSet's replicas, nats-0..N-1, each resolvable as
     nats-N.<serviceName>) forms its cluster; web, inference and the downloader
     service (Deployments, one replica each) answer their liveness probes
  2. the downloader Job stores MNIST and queues a train.request
  3. KEDA's query (the ScaledJob trigger's stream and consumer, against the
     monitoring endpoint it names; on a cluster /varz there, then each advertised
     server, the consumer leader's answer) sees that request as lag
  4. a trainer Job (the ScaledJob's template, started here as KEDA would)
     consumes it, trains, publishes and promotes a version, exits 0
  5. inference hot-reloads it (readiness 200) and answers /v1/predict with that
     version; the web container answers /api/predict (over NATS) with it too,
     and serves the page
  6. SIGTERM: every Deployment exits 0 within its grace period

What differs from the cluster, and why (printed at the start of each run): the
images come from the local build; NATS is the nats-server binary of the same
version as the manifest's image, in our Debian base image (no Docker Hub here);
the downloader reads a file:// mirror of the real files (no internet here); the
trainer Job gets a short time limit and no accuracy floor (a CI-sized run);
Deployments run one replica (NATS runs as many as its StatefulSet says); the store claim is a directory that starts owned by
root with mode 0755, as a new Filestore share does, and gets the pods' fsGroup as
the kubelet gives it (the Filestore CSI driver's fsGroupPolicy is File).

With --quick (images of debug binaries: what CI runs) the whole run is the same.
--break WHAT changes one thing in the rendered manifests first, and the run must
fail (k8s/check runs this to show that the rehearsal catches such mistakes):
  port   the web container listens on another port than its Service targets
  tmp    the downloader Job loses its /tmp volume (a read-only root is all it has)
  env    NATS_URL is missing from the ConfigMap
  fsgroup  no stage pod sets fsGroup (the store stays root's: uid 65532 cannot write it)

Usage: rehearsal.py [--tag TAG] [--overlay NAME] [--break WHAT] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NATS_SERVER = (ROOT / ".tools" / "bin" / "nats-server").resolve()
KUBECTL = ROOT / ".tools" / "venv" / "bin" / "kubectl"
MNIST = Path(os.environ.get("MNIST_DIR", ROOT.parent / "shared" / "mnist"))
PODMAN = ["podman", "--runtime", "runc"]
BASE_IMAGE = "localhost/mnistflow/debian:bookworm"
STORE_PATH = "/var/lib/mnistflow/store"
TRAINER_OVERRIDES = {"TRAINER_MAX_MINUTES": "0.2", "TRAINER_ACCURACY_FLOOR": "0"}
MIRROR = {"DOWNLOADER_MIRRORS": "file:///mirror/"}

failures: list[str] = []


def ok(what: str, started: float | None = None) -> None:
    took = f" ({time.monotonic() - started:.1f} s)" if started is not None else ""
    print(f"  ok   {what}{took}", flush=True)


def fail(what: str) -> None:
    failures.append(what)
    print(f"  FAIL {what}", flush=True)


def http(method: str, url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(what: str, timeout: float, probe):
    """Polls probe() until it returns something truthy, or fails with what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout:.0f} s waiting for {what}")
            return None
        time.sleep(0.25)


def mnist_digit(index: int) -> tuple[bytes, int]:
    """The index-th real MNIST test digit as an 8-bit grayscale PNG, and its label."""
    images = gzip.decompress((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    pixels = images[16 + index * 784: 16 + (index + 1) * 784]
    raw = b"".join(b"\x00" + pixels[row * 28:(row + 1) * 28] for row in range(28))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return png, labels[8 + index]


def render(overlay: str) -> tuple[list[dict], dict]:
    """The overlay's objects, and the Secret a user creates (the base's, with its keys)."""
    def kustomize(path: Path) -> list[dict]:
        out = subprocess.run([str(KUBECTL), "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    docs = kustomize(ROOT / "k8s" / "overlays" / overlay)
    base = kustomize(ROOT / "k8s" / "base")
    # GKE overlays leave the Secrets and the signing keyring to the user (k8s/README.md,
    # "Secrets"): the base's objects stand in for them, with the same keys.
    for kind, name in [("Secret", "mnistflow-secrets"), ("Secret", "mnistflow-model-signing"),
                       ("ConfigMap", "mnistflow-model-keys")]:
        if not any(d["kind"] == kind and d["metadata"]["name"] == name for d in docs):
            docs.append(next(d for d in base if d["kind"] == kind and d["metadata"]["name"] == name))
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "mnistflow-secrets")
    return docs, secret


def breakage(docs: list[dict], what: str) -> str:
    """Breaks one thing in the rendered manifests; returns what was broken."""
    def pod(kind: str, name: str) -> dict:
        d = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
        return d["spec"]["template"]["spec"]

    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mnistflow-config"))
    if what == "port":
        config["data"]["WEB_PORT"] = "8081"
        return "WEB_PORT=8081 while the web Service targets containerPort 8080"
    if what == "tmp":
        spec = pod("Job", "downloader")
        spec["containers"][0]["volumeMounts"] = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] != "/tmp"]
        return "the downloader Job's /tmp emptyDir mount removed"
    if what == "env":
        del config["data"]["NATS_URL"]
        return "NATS_URL removed from the ConfigMap"
    if what == "fsgroup":
        for d in docs:
            if d["kind"] in ("Deployment", "Job", "ScaledJob"):
                tpl = d["spec"]["jobTargetRef"]["template"] if d["kind"] == "ScaledJob" else d["spec"]["template"]
                tpl["spec"].get("securityContext", {}).pop("fsGroup", None)
        return "fsGroup removed from every pod that mounts the store"
    raise SystemExit(f"--break: unknown {what!r} (port, tmp, env, fsgroup)")


class Cluster:
    """The rendered objects run as podman containers on one network."""

    def __init__(self, docs: list[dict], secret: dict, tag: str, tmp: Path):
        self.docs, self.tag, self.tmp = docs, tag, tmp
        self.secret = {**secret.get("stringData", {})}
        self.network = f"mnistflow-rehearsal-{os.getpid()}"
        self.containers: list[str] = []
        # How long a Deployment may take to answer its liveness probe (the debug
        # binaries start in seconds; a broken run need not wait out a long budget).
        self.patience = 60.0
        self.store = tmp / "store"
        self.store.mkdir()
        os.chmod(self.store, 0o755)  # a new Filestore share: root's, 0755
        subprocess.run(PODMAN + ["network", "create", self.network], check=True, capture_output=True)

    def object(self, kind: str, name: str) -> dict:
        return next(d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name)

    def image(self, name: str) -> str:
        stage = name.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
        return BASE_IMAGE if stage == "nats" else f"localhost/mnistflow/{stage}:{self.tag}"

    def aliases(self, labels: dict) -> list[str]:
        """The Services whose selector picks a pod with these labels."""
        return [s["metadata"]["name"] for s in self.docs if s["kind"] == "Service"
                and s["spec"].get("selector") and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]

    def env(self, container: dict, pod_name: str) -> dict[str, str]:
        maps = {(d["kind"], d["metadata"]["name"]): d for d in self.docs if d["kind"] in ("ConfigMap", "Secret")}
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(maps[("ConfigMap", source["configMapRef"]["name"])]["data"])
            if "secretRef" in source:
                env.update(self.secret)
        for e in container.get("env", []):
            ref = e.get("valueFrom") or {}
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "secretKeyRef" in ref:
                env[e["name"]] = self.secret[ref["secretKeyRef"]["key"]]
            elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[e["name"]] = pod_name
            else:
                raise SystemExit(f"{pod_name}: env {e['name']}: a source this rehearsal cannot supply: {ref}")
        return env

    def template(self, kind: str, name: str) -> dict:
        d = self.object(kind, name)
        return d["spec"]["jobTargetRef"]["template"] if kind == "ScaledJob" else d["spec"]["template"]

    def run_args(self, kind: str, name: str, pod_name: str, overrides: dict[str, str],
                 extra_volumes: list[str], container: dict | None = None) -> tuple[list[str], dict]:
        tpl = self.template(kind, name)
        spec = tpl["spec"]
        container = container or spec["containers"][0]
        pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
        cname = f"{self.network}-{pod_name}" + ("" if container is spec["containers"][0] else f"-{container['name']}")
        args = ["--name", cname, "--hostname", pod_name, "--network", self.network,
                "--log-driver", "k8s-file", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
        for alias in self.aliases(tpl["metadata"].get("labels", {})):
            args += ["--network-alias", alias]
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else user}"]
        if pod_sc.get("fsGroup") is not None:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        for cap in sc.get("capabilities", {}).get("add", []):
            args += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", limits["memory"].replace("Gi", "g").replace("Mi", "m")]
        if "cpu" in limits:
            cpu = limits["cpu"]
            args += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in container.get("volumeMounts", []):
            v, ro = volumes.get(m["name"]), m.get("readOnly", False)
            if v is None and m["name"] == "data":  # the StatefulSet's volumeClaimTemplate
                data = self.tmp / f"{pod_name}-data"
                data.mkdir(exist_ok=True)
                if pod_sc.get("fsGroup") is not None:  # a block volume gets fsGroup ownership from the kubelet
                    os.chown(data, 0, pod_sc["fsGroup"])
                    os.chmod(data, 0o2775)
                args += ["-v", f"{data}:{m['mountPath']}"]
            elif v is None:
                raise SystemExit(f"{pod_name}: volumeMount {m['name']} names no volume")
            elif "emptyDir" in v:
                size = v["emptyDir"].get("sizeLimit", "256Mi").replace("Mi", "m").replace("Gi", "g")
                args += ["--mount", f"type=tmpfs,destination={m['mountPath']},tmpfs-size={size},tmpfs-mode=1777"]
            elif "configMap" in v:
                cm = self.object("ConfigMap", v["configMap"]["name"])
                folder = self.tmp / f"{pod_name}-{m['name']}"
                folder.mkdir(exist_ok=True)
                for key, value in cm["data"].items():
                    (folder / key).write_text(value)
                args += ["-v", f"{folder}:{m['mountPath']}:ro"]
            elif "secret" in v:  # a Secret's files, as the kubelet projects them
                sec = self.object("Secret", v["secret"]["secretName"])
                folder = self.tmp / f"{pod_name}-{m['name']}"
                folder.mkdir(exist_ok=True)
                files = {**{k: base64.b64decode(val).decode() for k, val in sec.get("data", {}).items()},
                         **sec.get("stringData", {})}
                for key, value in files.items():
                    (folder / key).write_text(value)
                    (folder / key).chmod(0o444)
                args += ["-v", f"{folder}:{m['mountPath']}:ro"]
            elif "persistentVolumeClaim" in v:
                if pod_sc.get("fsGroup") is not None:
                    apply_fs_group(self.store, pod_sc["fsGroup"])
                args += ["-v", f"{self.store}:{m['mountPath']}{':ro' if ro else ''}"]
            else:
                raise SystemExit(f"{pod_name}: volume {m['name']}: a kind this rehearsal cannot supply: {v}")
        args += extra_volumes
        for k, val in {**self.env(container, pod_name), **overrides}.items():
            args += ["-e", f"{k}={val}"]
        command, cargs = container.get("command"), container.get("args", [])
        image = self.image(container["image"])
        if image == BASE_IMAGE:  # NATS: the same server version as the manifest's image, mounted in
            args += ["-v", f"{NATS_SERVER}:/nats-server:ro"]
            command = command or ["/nats-server"]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        return args + [image] + cargs, container

    def init_containers(self, kind: str, name: str, pod_name: str) -> bool:
        """Runs the pod's initContainers in order, as the kubelet does; False if one fails."""
        for init in self.template(kind, name)["spec"].get("initContainers", []):
            args, _ = self.run_args(kind, name, pod_name, {}, [], init)
            self.containers.append(args[args.index("--name") + 1])
            proc = subprocess.run(PODMAN + ["run"] + args, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                fail(f"{kind}/{name}: initContainer {init['name']} exited {proc.returncode}\n{(proc.stderr + proc.stdout)[-2000:]}")
                return False
        return True

    def start(self, kind: str, name: str, overrides: dict[str, str] | None = None, ordinal: int = 0) -> tuple[str, dict]:
        pod_name = f"{name}-{ordinal}" if kind == "StatefulSet" else f"{name}-{kind.lower()}"
        self.init_containers(kind, name, pod_name)
        args, container = self.run_args(kind, name, pod_name, overrides or {}, [])
        if kind == "StatefulSet":
            # A StatefulSet's pod resolves as <pod>.<serviceName> (the routes use these names).
            i = args.index("--network")
            args[i:i] = ["--network-alias", f"{pod_name}.{self.object(kind, name)['spec']['serviceName']}"]
        cname = args[args.index("--name") + 1]
        subprocess.run(PODMAN + ["run", "-d"] + args, check=True, capture_output=True, text=True)
        self.containers.append(cname)
        return cname, container

    def run_to_end(self, kind: str, name: str, overrides: dict[str, str], extra: list[str], timeout: float) -> tuple[int, str]:
        pod_name = f"{name}-{kind.lower()}"
        if not self.init_containers(kind, name, pod_name):
            return -1, "an initContainer failed"
        args, _ = self.run_args(kind, name, pod_name, overrides, extra)
        cname = args[args.index("--name") + 1]
        self.containers.append(cname)
        try:
            proc = subprocess.run(PODMAN + ["run"] + args, capture_output=True, text=True, timeout=timeout)
            return proc.returncode, (proc.stderr + proc.stdout)[-3000:]
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {timeout:.0f} s\n{self.logs(cname)}"

    def ip(self, cname: str) -> str:
        out = subprocess.run(PODMAN + ["inspect", "-f", "{{json .NetworkSettings.Networks}}", cname],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)[self.network]["IPAddress"]

    def logs(self, cname: str) -> str:
        proc = subprocess.run(PODMAN + ["logs", cname], capture_output=True, text=True)
        return "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])

    def close(self) -> None:
        for cname in self.containers:
            subprocess.run(PODMAN + ["rm", "-f", "-t", "0", cname], capture_output=True)
        subprocess.run(PODMAN + ["network", "rm", "-f", self.network], capture_output=True)
        subprocess.run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(self.tmp)], capture_output=True)


def apply_fs_group(path: Path, gid: int) -> None:
    """What the kubelet does at mount time for a pod with fsGroup on a volume whose CSI
    driver declares fsGroupPolicy File (Filestore's; components/gke) and
    fsGroupChangePolicy OnRootMismatch: if the volume's root is not yet the group's,
    give everything the group, group write, and setgid on directories."""
    if path.stat().st_gid == gid:
        return
    for p in [path, *path.rglob("*")]:
        os.chown(p, -1, gid)
        mode = p.stat().st_mode
        os.chmod(p, mode | 0o060 | (0o2010 if p.is_dir() else 0))


def port_of(container: dict, port) -> int:
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    return named.get(port, port)


def probe_url(ip: str, container: dict, probe: str) -> str | None:
    get = (container.get(probe) or {}).get("httpGet")
    return f"http://{ip}:{port_of(container, get['port'])}{get['path']}" if get else None


def keda_lag(cluster: Cluster, nats_ips: list[str]) -> tuple[int | None, str]:
    """What the ScaledJob's nats-jetstream trigger would read (KEDA 2.20): /jsz on its
    endpoint (the headless Service: any server); on a cluster, /varz there, then
    each advertised server's /varz and /jsz, and the consumer leader's answer."""
    meta = cluster.object("ScaledJob", "trainer")["spec"]["triggers"][0]["metadata"]
    port = meta["natsServerMonitoringEndpoint"].rsplit(":", 1)[1]
    host = meta["natsServerMonitoringEndpoint"].split(".")[0]
    query = f"/jsz?acc={meta['account']}&consumers=true&config=true"

    def consumer(ip: str) -> tuple[dict | None, dict, str]:
        status, body = http("GET", f"http://{ip}:{port}{query}")
        if status != 200:
            return None, {}, f"GET {host}:{port}/jsz answered {status}"
        jsz = json.loads(body)
        for acc in jsz.get("account_details", []):
            if acc["name"] != meta["account"]:
                continue
            for stream in acc.get("stream_detail", []):
                if stream["name"] != meta["stream"]:
                    continue
                for c in stream.get("consumer_detail", []):
                    if c["name"] == meta["consumer"]:
                        return c, jsz, ""
                return None, jsz, f"consumer {meta['consumer']!r} not found in stream {meta['stream']!r} (KEDA 2.20: an error, no Job)"
        return None, jsz, f"stream {meta['stream']!r} not found in account {meta['account']!r}"

    first, jsz, error = consumer(nats_ips[0])
    lag = lambda c: c["num_pending"] + c["num_ack_pending"]  # noqa: E731
    # Like KEDA, a first answer without the stream is no error on a cluster: a
    # stream of fewer replicas than servers lives on some of them only.
    if (jsz.get("meta_cluster") or {}).get("cluster_size", 1) <= 1:
        return (lag(first), f"{meta['stream']}/{meta['consumer']} via {host}:{port}") if first else (None, error)
    status, body = http("GET", f"http://{nats_ips[0]}:{port}/varz")
    for url in json.loads(body).get("connect_urls", []) if status == 200 else []:
        ip = url.split(":")[0]
        status, varz = http("GET", f"http://{ip}:{port}/varz")
        name = json.loads(varz).get("server_name") if status == 200 else None
        c, _, _ = consumer(ip)
        if c and name and c.get("cluster", {}).get("leader") == name:
            return lag(c), f"{meta['stream']}/{meta['consumer']} via {host}:{port}, from its leader {name}"
    if first:
        return lag(first), f"{meta['stream']}/{meta['consumer']} via {host}:{port} (no advertised server claims its leadership)"
    return None, error or f"no server advertised by {host}:{port}/varz leads {meta['consumer']!r}"


def rehearse(cluster: Cluster) -> None:
    t = time.monotonic()
    replicas = cluster.object("StatefulSet", "nats")["spec"].get("replicas", 1)
    servers = [cluster.start("StatefulSet", "nats", ordinal=i) for i in range(replicas)]
    nats_ips = [cluster.ip(cname) for cname, _ in servers]
    for (cname, c), ip in zip(servers, nats_ips):
        if not wait_for("NATS' startup probe", 60, lambda: http("GET", probe_url(ip, c, "startupProbe"))[0] == 200):
            fail(f"{cname} never became healthy\n{cluster.logs(cname)}")
            return
    if replicas > 1:
        status, body = http("GET", f"http://{nats_ips[0]}:{port_of(servers[0][1], 'monitor')}/jsz")
        size = (json.loads(body).get("meta_cluster") or {}).get("cluster_size") if status == 200 else None
        if size != replicas:
            fail(f"StatefulSet/nats: {replicas} servers but a JetStream cluster of {size}\n{cluster.logs(servers[0][0])}")
            return
    ok(f"StatefulSet/nats: {replicas} server(s) from the rendered nats-config"
       + (f", routed by their names under the headless Service into one JetStream cluster" if replicas > 1 else "")
       + ", the Secret's credentials, JetStream on each server's volume", t)

    deployments = {}
    for d in [d for d in cluster.docs if d["kind"] == "Deployment"]:
        name = d["metadata"]["name"]
        t = time.monotonic()
        cname, c = cluster.start("Deployment", name)
        ip = cluster.ip(cname)
        deployments[name] = (cname, c, ip)
        live = probe_url(ip, c, "livenessProbe")
        if wait_for(f"{name}'s liveness probe", cluster.patience, lambda: http("GET", live)[0] == 200):
            ok(f"Deployment/{name}: liveness {live.split(ip, 1)[1]} 200 (Services: {', '.join(cluster.aliases(d['spec']['template']['metadata']['labels'])) or 'none'})", t)
        else:
            fail(f"Deployment/{name}: liveness {live} never answered 200\n{cluster.logs(cname)}")
            return
    for name, (cname, c, ip) in deployments.items():
        service = next((s for s in cluster.docs if s["kind"] == "Service" and s["metadata"]["name"] == name), None)
        if service:
            target = port_of(c, service["spec"]["ports"][0]["targetPort"])
            if http("GET", f"http://{ip}:{target}/healthz")[0] != 200:
                fail(f"Service/{name} targets port {target}, where the container does not answer")
    if failures:
        return

    t = time.monotonic()
    code, out = cluster.run_to_end("Job", "downloader", MIRROR, ["-v", f"{MNIST}:/mirror:ro"], 300)
    manifests = list(cluster.store.glob("datasets/mnist/*/manifest.json"))
    if code != 0 or not manifests:
        fail(f"Job/downloader: exit {code}, {len(manifests)} data set manifest(s)\n{out}")
        return
    ok("Job/downloader: stored MNIST in the shared store and queued a train.request, exit 0", t)

    last: list[tuple[int | None, str]] = [(None, "")]
    lag, where = wait_for("KEDA's lag", 20, lambda: (lambda r: last.__setitem__(0, r) or (r if r[0] else None))(
        keda_lag(cluster, nats_ips))) or last[0]
    if not lag:
        fail(f"KEDA's query sees no lag: {where or f'lag {lag}'}")
        return
    ok(f"KEDA's query sees lag {lag} on {where}: the ScaledJob would start a Job")

    t = time.monotonic()
    code, out = cluster.run_to_end("ScaledJob", "trainer", TRAINER_OVERRIDES, [], 600)
    current = cluster.store / "models" / "mnist-cnn" / "CURRENT"
    if code != 0 or not current.exists():
        fail(f"ScaledJob/trainer: exit {code}, CURRENT {'exists' if current.exists() else 'missing'}\n{out}")
        return
    version = current.read_text().strip()
    ok(f"ScaledJob/trainer: consumed the request, published and promoted {version}, exit 0", t)

    png, label = mnist_digit(0)
    if "inference" in deployments:
        cname, c, ip = deployments["inference"]
        t = time.monotonic()
        ready = probe_url(ip, c, "readinessProbe")
        if not wait_for("inference's readiness", 90, lambda: http("GET", ready)[0] == 200):
            fail(f"Deployment/inference never became ready\n{cluster.logs(cname)}")
            return
        status, body = http("POST", f"http://{ip}:{port_of(c, 'http')}/v1/predict", png, "image/png")
        answer = json.loads(body or b"{}") if status == 200 else {}
        if answer.get("model_version") != version:
            fail(f"inference /v1/predict: HTTP {status} {body[:200]!r}, expected an answer of {version}")
            return
        ok(f"Deployment/inference: hot-reloaded {version}; /v1/predict on a {label}: {answer['digit']}", t)
    if "web" in deployments:
        cname, c, ip = deployments["web"]
        service = cluster.object("Service", "web")["spec"]["ports"][0]
        base = f"http://{ip}:{port_of(c, service['targetPort'])}"
        status, body = http("POST", f"{base}/api/predict", png, "image/png")
        answer = json.loads(body or b"{}") if status == 200 else {}
        page_status, page = http("GET", f"{base}/")
        if answer.get("model_version") != version:
            fail(f"web /api/predict: HTTP {status} {body[:200]!r}, expected an answer of {version}\n{cluster.logs(cname)}")
        elif page_status != 200 or b"<html" not in page.lower():
            fail(f"web /: HTTP {page_status}")
        else:
            ok(f"Deployment/web: /api/predict through NATS answered {answer['digit']} from {version}; the page loads")

    for name, (cname, c, _) in deployments.items():
        spec = cluster.object("Deployment", name)["spec"]["template"]["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        t = time.monotonic()
        subprocess.run(PODMAN + ["stop", "-t", str(grace), cname], capture_output=True)
        code = subprocess.run(PODMAN + ["inspect", "-f", "{{.State.ExitCode}}", cname], capture_output=True, text=True).stdout.strip()
        if code == "0":
            ok(f"Deployment/{name}: SIGTERM -> exit 0 within its {grace} s grace", t)
        else:
            fail(f"Deployment/{name}: SIGTERM -> exit {code}\n{cluster.logs(cname)}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="0.1.0")
    parser.add_argument("--overlay", default="gke")
    parser.add_argument("--break", dest="broken")
    parser.add_argument("--quick", action="store_true", help="accepted for k8s/build-images; the run is the same")
    args = parser.parse_args()
    started = time.monotonic()
    docs, secret = render(args.overlay)
    print(f"rehearsal of overlays/{args.overlay} (podman network, images localhost/mnistflow/*:{args.tag})", flush=True)
    print("       differs from the cluster: local images; nats-server binary for the nats image; file:// mirror; "
          f"trainer {', '.join(f'{k}={v}' for k, v in TRAINER_OVERRIDES.items())}; one replica per Deployment", flush=True)
    if args.broken:
        print(f"       broken on purpose: {breakage(docs, args.broken)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mnistflow-rehearsal-") as tmp:
        cluster = Cluster(docs, secret, args.tag, Path(tmp))
        if args.broken:
            cluster.patience = 20.0
        try:
            rehearse(cluster)
        finally:
            cluster.close()
    took = time.monotonic() - started
    print(f"rehearsal: {'passed' if not failures else f'{len(failures)} FAILED'} in {took:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
