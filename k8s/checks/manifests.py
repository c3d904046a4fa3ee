#!/usr/bin/env python3
"""Checks of the kustomize tree that need no cluster (run by k8s/check).

  render     every overlay (and the base) renders with `kubectl kustomize`
  schema     every built-in object passes `kubernetes-validate --strict` for each
             supported Kubernetes version, with no warning at all; the KEDA
             custom resources pass their CRD schemas from npm (@kubernetes-models:
             KEDA, Prometheus Operator, Gateway API, GKE; a kind without one fails,
             but for GKE Managed Prometheus' PodMonitoring and Rules, named as unverified),
             and the ScaledJob's job template passes the strict batch/v1 Job schema;
             broken copies of the Gateway API and GKE objects must be rejected
             (crd-validate.js --self-test)
  gateway    where a Gateway serves the page: its routes and policies name objects
             that exist (listeners, Services and ports, the health check's path on
             the web pods), plain HTTP only redirects to HTTPS, and the web Service
             is not a LoadBalancer (no clear-text way in)
  same-pod   the plain trainer Job (components/without-keda) runs the same pod
             as the ScaledJob's template, but for its longer request wait
  grace      each pod's terminationGracePeriodSeconds exceeds its preStop sleep
             plus the service's own drain deadline from the ConfigMap
  env        every environment variable a stage binary reads (its own list,
             `<binary> --print-env-vars`, built from its Config) is set by the
             ConfigMap/Secret or a container, or listed in base/optional-env.txt;
             every key we set is read by some code; no stale optional entries
  nats-cluster  in every overlay the StatefulSet is a cluster that survives a lost
             server: routes to each replica under the headless Service (route port,
             not-ready pods published), a cluster name, an odd count, Parallel start,
             a PDB that keeps the quorum, one server per node and spread over zones,
             JetStream's store_dir on the per-server volume within its size, the
             lame-duck preStop on the configured pid file (on a writable volume),
             NATS_URL naming every server and NATS_STREAM_REPLICAS equal to the
             servers, and KEDA's endpoint on the headless Service
  nats       the real nats-server accepts the rendered nats-config (nats.conf and
             the cluster.conf it includes) and, one server per replica on 127.0.0.1-3
             with the same ports and the routes' names resolved there, forms one
             JetStream cluster (meta group of nats-0..2), enforces the Secret's
             credentials and serves monitoring; the preStop command puts a server in
             lame duck mode (its client is told); the local overlay's single server
             starts healthy
  nats-tls   where an overlay turns TLS on (components/nats-tls): the certificate
             files nats.conf names are keys of the Secrets mounted there; every
             stage mounts ca.crt where NATS_TLS_CA points; the cert-manager
             Certificates name every host of NATS_URL (server) and every route
             (routes, for server and client use); the monitoring port stays plain
             HTTP for KEDA (useHttps false) and Prometheus. Then three real servers
             run the overlay's nats-config with certificates made here for those
             names: the cluster forms over TLS routes, a client verifying the CA
             gets PONG, a clear-text client does not
  ports      every containerPort and probe port matches the port the ConfigMap
             tells the service to listen on; image tags match the workspace version
  store      every stage that reads STORE_URL gets the store: a path is a mounted
             volume of a claim that exists in the overlay; gs:// and s3:// mount none
  serving-path  serving inference mounts the store read-only (mount and claim) and
             runs without the in-process promoter; a promoter Deployment (the
             inference binary, INFERENCE_ROLE=promoter) executes model.promote;
             serving inference never mounts or references the private model-signing
             key (Secret mnistflow-model-signing) and verifies with a keyring on a
             ConfigMap volume (INFERENCE_TRUSTED_KEYS); the trainer and the promoter
             sign with a file of that Secret; the check rejects the base with each
             of those undone
  store-permissions  on the GKE overlays every pod that mounts a claim uses a Filestore
             class (whose CSI driver lets the kubelet apply fsGroup) and runs as a
             non-root uid whose group is the pod's fsGroup, OnRootMismatch: the share
             becomes group-writable at first mount, without a chown pod
  autopilot  the gke-autopilot* overlays, alone and with components/spot-trainer, ask
             for what Autopilot accepts unchanged: requests = limits for CPU, memory and
             ephemeral storage, 250m CPU steps and 512Mi at least per pod, 1 to 6.5 GiB
             per vCPU (not for GPU pods, which must select an accelerator), emptyDirs
             within ephemeral storage, nothing privileged, hostPath or host namespace
  flows      the NetworkPolicies, evaluated like a CNI would for pods labelled as
             the rendered templates are, allow each flow of DESIGN.md and deny a list
             of flows that must not happen (web -> inference, trainer -> internet, ...);
             every pod's DNS path to each resolver a cluster may give it (the kube-dns
             pods, Cloud DNS at 169.254.169.254, NodeLocal DNSCache at 169.254.20.10;
             UDP and TCP 53) is required. It evaluates the policies as written, ipBlock
             peers against every address (pods have theirs in 10.8.0.0/16, so a policy
             that admits pods by IP range is caught); rewriting by the dataplane before
             policy (DNAT of link-local addresses to the node's) is not modelled
  run        (--run) each workload's real binary (target/debug) runs with exactly
             the environment its pod would get (ConfigMap + Secret + env), against
             that NATS server: only listen addresses, the store path, the mirror
             and the training time limit are changed. The downloader Job stores
             MNIST from a file:// mirror and exits 0; the trainer Job consumes the
             train.request it published, publishes a version and exits 0; every
             Deployment answers its probes' paths (liveness 200, readiness not
             404) and its PodMonitors' metrics paths (200) and, on SIGTERM, exits 0 before its grace period would kill it

  --self-test  each check above that reads the rendered manifests (schema, env,
             grace, ports, store, store-permissions, autopilot, gateway, flows,
             nats-cluster, nats-tls)
             must reject a deliberately broken copy of them (a few seconds; k8s/check
             runs it)

Usage: manifests.py OUT_DIR [--run]   (rendered YAML is left in OUT_DIR for checkov)
       manifests.py --self-test
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent.parent
ROOT = K8S.parent
TOOLS = ROOT / ".tools"
VENV_BIN = TOOLS / "venv" / "bin"
NATS_BIN = TOOLS / "bin" / "nats-server"
# The oldest version we support (GKE's stable channel when this was written) and the newest schema shipped.
KUBE_VERSIONS = ["1.33.0", "1.37.0"]
# Crates whose binaries run in the cluster, and the foundation code they share.

failures: list[str] = []


def fail(what: str) -> None:
    failures.append(what)
    print(f"  FAIL {what}", flush=True)


def ok(what: str) -> None:
    print(f"  ok   {what}", flush=True)


def tool(name: str) -> str:
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: run MNISTFLOW_K8S_TOOLS=1 scripts/setup")
    return found


def overlays() -> list[tuple[str, Path]]:
    found = [("base", K8S / "base")]
    found += sorted((p.name, p) for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    return found


def render(out: Path) -> dict[str, list[dict]]:
    print("render", flush=True)
    kubectl = tool("kubectl")
    rendered = {}
    for name, path in overlays():
        proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            fail(f"{name}: kubectl kustomize: {proc.stderr.strip()}")
            continue
        (out / f"{name}.yaml").write_text(proc.stdout)
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        rendered[name] = docs
        ok(f"{name}: {len(docs)} objects")
    return rendered


def config_map(docs: list[dict], name: str) -> dict | None:
    """A ConfigMap by its kustomize name (generated ones carry a content hash suffix)."""
    return next((d for d in docs if d["kind"] == "ConfigMap"
                 and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])), None)


CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/", "gateway.networking.k8s.io/", "networking.gke.io/", "cert-manager.io/")


def is_custom(doc: dict) -> bool:
    """A custom resource with a schema from npm (KEDA, Prometheus Operator, Gateway API, GKE, cert-manager)."""
    return doc.get("apiVersion", "").startswith(CRD_GROUPS)


# Custom resources whose schema cannot be installed here (GKE Managed Prometheus'
# PodMonitoring and Rules): rendered, not validated, and named as unverified.
UNVERIFIED_GROUPS = ("monitoring.googleapis.com/",)


def schema(rendered: dict[str, list[dict]], out: Path) -> None:
    print("schema", flush=True)
    validate = tool("kubernetes-validate")
    custom_docs = []
    for name, docs in rendered.items():
        unverified = [d for d in docs if d.get("apiVersion", "").startswith(UNVERIFIED_GROUPS)]
        if unverified:
            print(f"  --   {name}: {', '.join(sorted(d['kind'] + '/' + d['metadata']['name'] for d in unverified))}: "
                  "no schema installable here, unverified")
        builtin = [d for d in docs if not is_custom(d) and d not in unverified]
        for d in docs:
            if is_custom(d):
                custom_docs.append((name, d))
                if d["kind"] == "ScaledJob":
                    # KEDA's schema leaves the job template open: check it as a real Job.
                    builtin.append({
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "metadata": {"name": f"{d['metadata']['name']}-scaledjob-template"},
                        "spec": d["spec"]["jobTargetRef"],
                    })
        path = out / f"{name}.builtin.yaml"
        path.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        for version in KUBE_VERSIONS:
            proc = subprocess.run([validate, "--strict", "-k", version, str(path)], capture_output=True, text=True)
            lines = (proc.stdout + proc.stderr).splitlines()
            bad = [line for line in lines if line.strip() and not line.startswith("INFO")]
            passed = sum(1 for line in lines if line.startswith("INFO") and " passed " in line)
            if proc.returncode != 0 or bad or passed != len(builtin):
                fail(f"{name}: kubernetes-validate --strict -k {version}: {passed}/{len(builtin)} passed")
                for line in bad:
                    print(f"       {line}")
            else:
                ok(f"{name}: {len(builtin)} built-in objects valid for Kubernetes {version}, no warnings")
    node_dir = TOOLS / "node"
    if not (node_dir / "node_modules" / "@kubernetes-models" / "prometheus-operator").exists():
        fail("CRD schema packages missing: run MNISTFLOW_K8S_TOOLS=1 scripts/setup")
        return
    payload = out / "crds.json"
    payload.write_text(json.dumps([{"source": n, "object": d} for n, d in custom_docs]))

    def crd_validate(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["node", str(K8S / "checks" / "crd-validate.js"), *args, str(payload)],
            capture_output=True,
            text=True,
            env={**os.environ, "NODE_PATH": str(node_dir / "node_modules")},
        )
        for line in proc.stdout.splitlines():
            print(f"  {line}")
        return proc

    proc = crd_validate()
    if proc.returncode != 0:
        fail(f"CRD schemas: {proc.stderr.strip() or 'invalid objects'}")
    # The schemas must reject what is wrong, not only accept what is right.
    proc = crd_validate("--self-test")
    if proc.returncode != 0:
        fail(f"CRD schema self-test: {proc.stderr.strip() or 'a broken object was accepted'}")


def same_pod() -> None:
    print("same-pod", flush=True)
    scaled = yaml.safe_load((K8S / "base" / "trainer.yaml").read_text())["spec"]["jobTargetRef"]
    plain = yaml.safe_load((K8S / "components" / "without-keda" / "trainer-job.yaml").read_text())["spec"]
    env = plain["template"]["spec"]["containers"][0]["env"]
    extra = [e for e in env if e["name"] == "TRAINER_JOB_WAIT_SECS"]
    plain["template"]["spec"]["containers"][0]["env"] = [e for e in env if e["name"] != "TRAINER_JOB_WAIT_SECS"]
    if len(extra) != 1:
        fail("without-keda trainer Job: expected exactly one TRAINER_JOB_WAIT_SECS override")
    if scaled != plain:
        fail("without-keda trainer Job differs from the ScaledJob's jobTargetRef (beyond TRAINER_JOB_WAIT_SECS)")
    else:
        ok("plain trainer Job == ScaledJob job template (+ TRAINER_JOB_WAIT_SECS)")


def pod_specs(docs: list[dict]):
    for d in docs:
        spec = d.get("spec") or {}
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield d, spec["template"]["spec"]
        elif d["kind"] == "ScaledJob":
            yield d, spec["jobTargetRef"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield d, spec["jobTemplate"]["spec"]["template"]["spec"]


def seconds(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", text)
    if not m:
        raise ValueError(text)
    value = float(m.group(1))
    return {"ms": value / 1000, "s": value, "m": value * 60, None: value}[m.group(2)]


def grace(rendered: dict[str, list[dict]]) -> None:
    print("grace", flush=True)
    for name, docs in rendered.items():
        config = (config_map(docs, "mnistflow-config") or {}).get("data", {})
        nats_conf = (config_map(docs, "nats-config") or {}).get("data", {}).get("nats.conf", "")
        for d, spec in pod_specs(docs):
            for c in spec["containers"]:
                env = dict(config)
                env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
                sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
                drain = {
                    "inference": lambda: seconds(env.get("INFERENCE_DRAIN_SECS", "20")),
                    "web": lambda: seconds(env.get("WEB_SHUTDOWN_GRACE_SECS", "5")),
                    "nats": lambda: seconds(re.search(r"lame_duck_duration:\s*(\S+)", nats_conf).group(1))
                    + seconds((re.search(r"lame_duck_grace_period:\s*(\S+)", nats_conf) or re.match("(0)", "0")).group(1)),
                }.get(c["name"], lambda: 0.0)()
                period = spec.get("terminationGracePeriodSeconds", 30)
                what = f"{name}: {d['kind']}/{d['metadata']['name']}: grace {period}s > preStop {sleep}s + drain {drain:g}s"
                if period > sleep + drain:
                    if name == "base":
                        ok(what)
                else:
                    fail(what)


STAGE_BINARIES = ("downloader", "trainer", "inference", "web", "feedback")


@functools.cache
def code_env_reads() -> dict[str, set[str]]:
    """Variable name -> stage binaries that read it, as each binary lists them itself
    (`<binary> --print-env-vars`: its Config's list, which a unit test per stage holds
    to exactly what Config::from_lookup reads). `PREFIX_*` stands for a prefix."""
    reads: dict[str, set[str]] = {}
    for binary in STAGE_BINARIES:
        path = ROOT / "target" / "debug" / binary
        if not path.is_file():
            sys.exit(f"{path} is missing: build the stage binaries first (k8s/check does)")
        listed = subprocess.run([str(path), "--print-env-vars"], capture_output=True, text=True, timeout=60,
                                check=True, env={"PATH": os.environ.get("PATH", "")}).stdout.split()
        if not listed:
            sys.exit(f"{binary} --print-env-vars printed nothing")
        for name in listed:
            reads.setdefault(name, set()).add(binary)
    return reads


def env(rendered: dict[str, list[dict]]) -> None:
    print("env", flush=True)
    reads = code_env_reads()
    base = rendered.get("base", [])
    config = config_map(base, "mnistflow-config")
    secret = next(d for d in base if d["kind"] == "Secret" and d["metadata"]["name"] == "mnistflow-secrets")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    container_env: dict[str, set[str]] = {}
    # Secret keys a container maps to a variable of another name (each stage's
    # NATS_<STAGE>_PASSWORD as NATS_PASSWORD) and those the NATS server reads (every
    # identity's password, for nats.conf): the key is used though no service reads it.
    mapped: set[str] = set()
    for name, docs in rendered.items():
        for d, spec in pod_specs(docs):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and (ref["key"] != e["name"] or c["name"] == "nats"):
                        mapped.add(ref["key"])
                if c["name"] == "nats":
                    continue  # the NATS server's own env (POD_NAME and its credentials)
                for e in c.get("env", []):
                    container_env.setdefault(e["name"], set()).add(f"{name}:{d['kind']}/{d['metadata']['name']}")
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and ref["key"] not in secret_keys:
                        fail(f"{name}: {d['kind']}/{d['metadata']['name']} reads Secret key {ref['key']} that the base Secret lacks")
    optional = {}
    for line in (K8S / "base" / "optional-env.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            optional[line] = True
    set_names = set(config["data"]) | (secret_keys - mapped) | set(container_env)
    documented = set_names | set(optional)

    missing = sorted(n for n in reads if n not in documented)
    for n in missing:
        fail(f"{n} is read by {', '.join(sorted(reads[n]))} but is neither set in k8s/base nor listed in optional-env.txt")
    unread = sorted(n for n in set_names if n not in reads)
    for n in unread:
        fail(f"{n} is set by the manifests but no service reads it (a typo?)")
    stale = sorted(n for n in optional if n not in reads)
    for n in stale:
        fail(f"optional-env.txt lists {n}, which no service reads any more")
    both = sorted(n for n in optional if n in set_names)
    for n in both:
        fail(f"{n} is both set by the manifests and listed as optional")
    if not (missing or unread or stale or both):
        ok(f"{len(reads)} variables listed by the stage binaries ({', '.join(STAGE_BINARIES)}): "
           f"{len(set_names & set(reads))} set by the manifests, {len(optional)} documented optional")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def free_port_on_all(used: set[int]) -> int:
    """A port nothing listens on at any of HOSTS (the servers share ports, as pods do)."""
    for _ in range(100):
        port = free_port()
        if port in used:
            continue
        try:
            for host in HOSTS[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        used.add(port)
        return port
    raise SystemExit(f"no port free on all of {HOSTS}")


class NatsUnderTest:
    """The StatefulSet's servers started with the rendered nats-config (every file
    of it: nats.conf includes cluster.conf), one per loopback address on the same
    ports, each with its own store directory; the routes' pod names
    (nats-N.nats-headless) resolve to 127.0.0.(N+1), as /etc/hosts would."""

    def __init__(self, rendered: dict[str, list[dict]], tmp: Path, overlay: str = "base",
                 tls_dirs: dict[str, Path] | None = None):
        docs = rendered[overlay]
        # Mounted certificate folders (/etc/nats-tls/server, ...) -> folders made here.
        self.tls_dirs = tls_dirs or {}
        self.files = config_map(docs, "nats-config")["data"]
        self.secret = next(d for d in rendered["base"]
                           if d["kind"] == "Secret" and d["metadata"]["name"] == "mnistflow-secrets")["stringData"]
        sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats")
        self.replicas = sts["spec"].get("replicas", 1)
        self.service = sts["spec"]["serviceName"]
        nats_c = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats")
        self.pre_stop = ((nats_c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command", [])
        used: set[int] = set()
        self.client, self.monitor, self.route = free_port_on_all(used), free_port_on_all(used), free_port_on_all(used)
        self.dirs = []
        for i in range(self.replicas):
            folder = tmp / f"nats-{i}"
            folder.mkdir()
            for name, text in self.files.items():
                text = text.replace("/data/jetstream", f"{folder}/jetstream").replace("/var/run/nats", str(folder))
                for mounted, here in self.tls_dirs.items():
                    text = text.replace(mounted + "/", f"{here}/")
                text = re.sub(r"nats-(\d+)\.%s:6222" % re.escape(self.service),
                              lambda m: f"{HOSTS[int(m.group(1)) % len(HOSTS)]}:{self.route}", text)
                (folder / name).write_text(text)
            self.dirs.append(folder)
        self.path = self.dirs[0] / "nats.conf"
        self.children: list[subprocess.Popen] = []

    def env(self, i: int) -> dict[str, str]:
        # Every identity's password (nats.conf's users read $NATS_<USER>_PASSWORD).
        return {**os.environ, "POD_NAME": f"nats-{i}",
                **{k: v for k, v in self.secret.items() if k.startswith("NATS_") and k.endswith("_PASSWORD")}}

    def identities(self) -> dict[str, str]:
        """Each NATS user of the Secret and its password (NATS_WEB_PASSWORD: user web)."""
        return {k[len("NATS_"):-len("_PASSWORD")].lower(): v for k, v in self.secret.items()
                if k.startswith("NATS_") and k.endswith("_PASSWORD")}

    def urls(self) -> str:
        return ",".join(f"nats://{HOSTS[i]}:{self.client}" for i in range(self.replicas))

    def test_config(self) -> str | None:
        for i, folder in enumerate(self.dirs):
            proc = subprocess.run([str(NATS_BIN), "-t", "-c", str(folder / "nats.conf")], capture_output=True,
                                  text=True, env=self.env(i))
            if proc.returncode != 0:
                return proc.stderr.strip()
        return None

    def get(self, i: int, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{HOSTS[i]}:{self.monitor}{path}", timeout=2) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def start(self) -> dict | None:
        """Starts every server; the first's /healthz once all are healthy (a
        clustered server is healthy once JetStream's meta group has formed)."""
        for i, folder in enumerate(self.dirs):
            args = ["-c", str(folder / "nats.conf"), "-a", HOSTS[i], "-p", str(self.client), "-m", str(self.monitor)]
            if self.replicas > 1:
                args += ["--cluster", f"nats://{HOSTS[i]}:{self.route}"]
            log = open(folder / "server.log", "w")
            self.children.append(subprocess.Popen([str(NATS_BIN), *args], env=self.env(i), stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = [self.get(i, "/healthz") for i in range(self.replicas)]
            if all(h and h.get("status") == "ok" for h in health):
                return health[0]
            time.sleep(0.2)
        return None

    def log(self, i: int) -> str:
        return "\n".join((self.dirs[i] / "server.log").read_text(errors="replace").splitlines()[-10:])

    def stop(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()

    def connect(self, user: str, password: str, i: int = 0, after_ping: bytes = b"", ca: Path | None = None) -> bytes:
        """CONNECT and PING as `user`; the server's answer. With `ca`, the
        connection is upgraded to TLS after INFO, verifying the server's
        certificate against `ca` for the address dialled (as a stage does)."""
        with socket.create_connection((HOSTS[i], self.client), timeout=5) as raw:
            raw.recv(4096)  # INFO
            s = raw
            if ca is not None:
                import ssl
                s = ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname=HOSTS[i])
            s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"user":%s,"pass":%s}\r\nPING\r\n'
                      % (json.dumps(user).encode(), json.dumps(password).encode()))
            answer = b""
            while b"PONG" not in answer and b"-ERR" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer


def nats_cluster_shape(rendered: dict[str, list[dict]]) -> None:
    """What makes the StatefulSet a cluster that survives one lost server, checked
    in every overlay: routes to each replica by its name under the headless Service
    (which carries the route port and publishes not-ready pods), a cluster name,
    JetStream on the per-server volume within its size, clients given every server
    and streams as many replicas as there are servers, a PDB that keeps the quorum,
    one server per node, the lame-duck preStop on the configured pid file, and
    KEDA's endpoint on the headless Service."""
    print("nats-cluster", flush=True)
    for name, docs in rendered.items():
        sts = next((d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats"), None)
        if sts is None:
            continue
        spec = sts["spec"]
        replicas = spec.get("replicas", 1)
        pod = spec["template"]["spec"]
        c = next(c for c in pod["containers"] if c["name"] == "nats")
        files = (config_map(docs, "nats-config") or {}).get("data", {})
        conf = "\n".join(files.values())
        config = (config_map(docs, "mnistflow-config") or {}).get("data", {})
        problems = []
        headless = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == spec["serviceName"]), None)
        if headless is None or headless["spec"].get("clusterIP") != "None":
            problems.append(f"serviceName {spec['serviceName']} is not a headless Service")
        routes = sorted(set(re.findall(r"nats-route://([\w.-]+):(\d+)", conf)))
        want = sorted({(f"nats-{i}.{spec['serviceName']}", "6222") for i in range(replicas)}) if replicas > 1 else []
        if routes != want:
            problems.append(f"routes {routes} are not one per replica under {spec['serviceName']} ({want})")
        if replicas > 1:
            if not re.search(r"cluster\s*\{[^}]*\bname:\s*\S+", conf):
                problems.append("no cluster name")
            if replicas % 2 == 0:
                problems.append(f"{replicas} servers: an even count adds no fault tolerance")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if ports.get("cluster") != 6222 or not headless or not any(p.get("port") == 6222 for p in headless["spec"]["ports"]):
                problems.append("the route port 6222 is not on the container and the headless Service")
            if not (headless or {}).get("spec", {}).get("publishNotReadyAddresses"):
                problems.append("the headless Service hides not-ready pods: the servers cannot find each other to become ready")
            if spec.get("podManagementPolicy") != "Parallel":
                problems.append("podManagementPolicy is not Parallel: nats-0 waits for a quorum that nats-1 never joins")
            pdb = next((d for d in docs if d["kind"] == "PodDisruptionBudget"
                        and d["spec"]["selector"].get("matchLabels", {}).items() <= spec["selector"]["matchLabels"].items()
                        and d["spec"]["selector"].get("matchLabels")), None)
            quorum = replicas // 2 + 1
            if pdb is None:
                problems.append("no PodDisruptionBudget for the NATS pods")
            else:
                allowed = pdb["spec"].get("maxUnavailable", replicas - pdb["spec"].get("minAvailable", 0))
                if not isinstance(allowed, int) or replicas - allowed < quorum or allowed < 1:
                    problems.append(f"PDB {pdb['metadata']['name']} lets {allowed} of {replicas} go (quorum {quorum}) or blocks every drain")
            anti = (((pod.get("affinity") or {}).get("podAntiAffinity") or {})
                    .get("requiredDuringSchedulingIgnoredDuringExecution") or [])
            if not any(t.get("topologyKey") == "kubernetes.io/hostname"
                       and t.get("labelSelector", {}).get("matchLabels", {}).items() <= spec["selector"]["matchLabels"].items()
                       for t in anti):
                problems.append("no required anti-affinity per node: two servers on one node lose the quorum with it")
            if not any(t.get("topologyKey") == "topology.kubernetes.io/zone" for t in pod.get("topologySpreadConstraints", [])):
                problems.append("no spread over zones")
        store = re.search(r"store_dir:\s*\"?([^\s\"]+)", conf)
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        claim = next((t for t in spec.get("volumeClaimTemplates", []) if t["metadata"]["name"] == "data"), None)
        if not store or not claim or not store.group(1).startswith(mounts.get("data", "/nonexistent") + "/"):
            problems.append("JetStream's store_dir is not on the per-server volume (volumeClaimTemplate data)")
        else:
            size = claim["spec"]["resources"]["requests"]["storage"]
            units = {"Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "MB": 10**6, "GB": 10**9, "TB": 10**12}
            m_file = re.search(r"max_file_store:\s*(\d+)(\w+)", conf)
            m_size = re.fullmatch(r"(\d+)(\w+)", size)
            if m_file and m_size and int(m_file.group(1)) * units[m_file.group(2)] > int(m_size.group(1)) * units[m_size.group(2)]:
                problems.append(f"max_file_store {m_file.group(0).split()[-1]} exceeds the volume ({size})")
        pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command", [])
        pid = re.search(r"pid_file:\s*\"?([^\s\"]+)", conf)
        if not pid or pre[-1:] != [f"ldm={pid.group(1)}"] or "--signal" not in pre:
            problems.append(f"preStop {pre} does not signal lame duck mode to pid_file {pid and pid.group(1)}")
        elif not any(pid.group(1).startswith(m + "/") for m in mounts.values()):
            problems.append(f"pid_file {pid.group(1)} is on the read-only root filesystem")
        urls = [u for u in config.get("NATS_URL", "").split(",") if u.strip()]
        if len(urls) != replicas:
            problems.append(f"NATS_URL names {len(urls)} server(s) for {replicas}")
        if config.get("NATS_STREAM_REPLICAS", "1") != str(replicas):
            problems.append(f"NATS_STREAM_REPLICAS={config.get('NATS_STREAM_REPLICAS')} with {replicas} server(s)")
        for job in (d for d in docs if d["kind"] == "ScaledJob"):
            for trigger in job["spec"]["triggers"]:
                if trigger["type"] == "nats-jetstream" and replicas > 1 and not trigger["metadata"][
                        "natsServerMonitoringEndpoint"].startswith(spec["serviceName"] + "."):
                    problems.append("KEDA's endpoint is not the headless Service (its /varz leads it to each server)")
        for p in problems:
            fail(f"{name}: StatefulSet/nats: {p}")
        if not problems and name in ("base", "local"):
            ok(f"{name}: NATS: {replicas} server(s), routes {[r[0] for r in routes]}, "
               f"NATS_STREAM_REPLICAS={config.get('NATS_STREAM_REPLICAS', '1')}, store on its own volume, "
               f"lame duck on preStop" + (", PDB keeps the quorum, one per node" if replicas > 1 else ""))


def nats(nats_server: NatsUnderTest) -> bool:
    print("nats", flush=True)
    error = nats_server.test_config()
    if error:
        fail(f"nats-server -t rejects nats.conf: {error}")
        return False
    health = nats_server.start()
    if not health or health.get("status") != "ok":
        logs = "\n".join(nats_server.log(i) for i in range(nats_server.replicas))
        fail(f"NATS with nats.conf: not every server's /healthz became ok within 30 s\n{logs}")
        return False
    identities = nats_server.identities()
    good = {user: nats_server.connect(user, password) for user, password in identities.items()}
    bad = nats_server.connect("web", "wrong")
    jsz = [nats_server.get(i, "/jsz") or {} for i in range(nats_server.replicas)]
    refused = sorted(user for user, answer in good.items() if b"PONG" not in answer)
    if refused or not (b"Authorization Violation" in bad and all("config" in j for j in jsz)):
        fail(f"nats.conf auth/monitoring: refused={refused} bad={bad[:80]!r} jsz keys={list(jsz[0])[:5]}")
        return False
    ok(f"nats.conf: valid; JetStream healthy; each identity's password accepted ({', '.join(sorted(good))}), "
       "a wrong one refused; /jsz served")
    if nats_server.replicas > 1:
        meta = [(j.get("meta_cluster") or {}) for j in jsz]
        # Each server lists the meta group's members but itself.
        names = sorted({m.get("leader", "") for m in meta} | {r["name"] for m in meta for r in m.get("replicas", [])})
        want = [f"nats-{i}" for i in range(nats_server.replicas)]
        if any(m.get("cluster_size") != nats_server.replicas for m in meta) or names != want:
            fail(f"the servers did not form one JetStream cluster of {want}: {meta}")
            return False
        routes = [len((nats_server.get(i, "/routez") or {}).get("routes", [])) for i in range(nats_server.replicas)]
        ok(f"the rendered config forms one JetStream cluster: {', '.join(names)} (meta leader "
           f"{meta[0].get('leader')}), routes per server {routes}")
    return True


def lame_duck(nats_server: NatsUnderTest) -> None:
    """The preStop command, run as the pod would run it, puts the server in lame
    duck mode: connected clients are told (INFO with ldm) and the server leaves."""
    print("lame-duck", flush=True)
    i = nats_server.replicas - 1
    with socket.create_connection((HOSTS[i], nats_server.client), timeout=5) as s:
        s.recv(4096)
        secret = nats_server.secret
        # protocol 1: a client that takes the server's later INFO messages (ldm among them).
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"user":%s,"pass":%s}\r\nPING\r\n'
                  % (b'"admin"', json.dumps(secret["NATS_ADMIN_PASSWORD"]).encode()))
        # The pod's own preStop command, the binary and the pid file's folder mapped here.
        command = [str(NATS_BIN) if a == "/nats-server" else a.replace("/var/run/nats", str(nats_server.dirs[i]))
                   for a in nats_server.pre_stop]
        proc = subprocess.run(command, capture_output=True, text=True)
        answer, deadline = b"", time.monotonic() + 10
        s.settimeout(1)
        while b'"ldm":true' not in answer and time.monotonic() < deadline:
            try:
                answer += s.recv(65536)
            except OSError:
                pass
    if proc.returncode == 0 and b'"ldm":true' in answer:
        ok(f"preStop's nats-server --signal ldm=<pid_file>: nats-{i} entered lame duck mode and told its clients")
    else:
        fail(f"preStop's lame duck signal: exit {proc.returncode} {proc.stderr.strip()[:200]}; client saw {answer[-200:]!r}")


TLS_KEYS = {"cert_file": "tls.crt", "key_file": "tls.key", "ca_file": "ca.crt"}


def tls_files(text: str) -> dict[str, str]:
    """cert_file/key_file/ca_file of the tls block in one nats-config file."""
    return dict(re.findall(r"\b(cert_file|key_file|ca_file):\s*\"?([^\s\"]+)", text))


def make_certificates(folder: Path, names: dict[str, tuple[list[str], bool]]) -> Path:
    """A CA and, for each Secret name, tls.crt/tls.key/ca.crt in folder/<secret>
    for its DNS names plus 127.0.0.1-3 (the servers run there); `True`: also for
    client use (routes). Returns the CA's file."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k8s/check NATS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    for secret, (dns, client) in names.items():
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(h)) for h in HOSTS]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, secret)])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (folder / secret).mkdir(parents=True)
        (folder / secret / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / secret / "tls.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / secret / "ca.crt").write_bytes(ca_pem)
    (folder / "ca.crt").write_bytes(ca_pem)
    return folder / "ca.crt"


def tls_problems(docs: list[dict]) -> tuple[list[str], dict[str, tuple[str, list[str], bool]]]:
    """What is wrong with an overlay's TLS to NATS, and, per mounted folder of the
    server, the Secret mounted there with the names its certificate must carry
    (and whether for client use too)."""
    problems: list[str] = []
    files = (config_map(docs, "nats-config") or {}).get("data", {})
    config = (config_map(docs, "mnistflow-config") or {}).get("data", {})
    client_tls, route_tls = tls_files(files.get("tls.conf", "")), tls_files(files.get("cluster-tls.conf", ""))
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats")
    pod = sts["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "nats")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])}
    urls = [u.strip() for u in config.get("NATS_URL", "").split(",") if u.strip()]
    url_hosts = sorted({re.sub(r"^\w+://", "", u).rsplit(":", 1)[0] for u in urls})
    route_hosts = sorted({h for h, _ in re.findall(r"nats-route://([\w.-]+):(\d+)", "\n".join(files.values()))})
    certificates = {d["spec"]["secretName"]: d for d in docs if d["kind"] == "Certificate"}
    wanted: dict[str, tuple[str, list[str], bool]] = {}
    for what, found, hosts, client in (("client port", client_tls, url_hosts, False),
                                       ("routes", route_tls, route_hosts, True)):
        if what == "routes" and not route_hosts:
            continue  # one server: no routes
        if "cert_file" not in found or "key_file" not in found:
            problems.append(f"{what}: no cert_file/key_file in the nats-config")
            continue
        folders = {os.path.dirname(p) for p in found.values()}
        if len(folders) != 1:
            problems.append(f"{what}: the certificate files are not in one folder: {found}")
            continue
        folder = folders.pop()
        secret = (mounts.get(folder) or {}).get("secret", {}).get("secretName")
        if not secret:
            problems.append(f"{what}: no Secret is mounted at {folder} in the nats container")
            continue
        for key, path in found.items():
            if os.path.basename(path) != TLS_KEYS[key]:
                problems.append(f"{what}: {key} {path} is not the Secret's {TLS_KEYS[key]}")
        if what == "routes" and (found.get("ca_file") is None or not re.search(r"\bverify:\s*true", files["cluster-tls.conf"])):
            problems.append("routes: the servers do not verify each other's certificate (ca_file, verify: true)")
        cert = certificates.get(secret)
        if cert is not None:
            missing = [h for h in hosts if h not in cert["spec"].get("dnsNames", [])]
            if missing:
                problems.append(f"{what}: Certificate/{cert['metadata']['name']} lacks the names dialled: {missing}")
            usages = set(cert["spec"].get("usages", []))
            if "server auth" not in usages or (client and "client auth" not in usages):
                problems.append(f"{what}: Certificate/{cert['metadata']['name']} usages {sorted(usages)}")
        wanted[folder] = (secret, hosts, client)
    if not re.search(r"^\s*http_port:\s*8222", files.get("nats.conf", ""), re.M):
        problems.append("the monitoring port 8222 is gone or moved (probes, KEDA and Prometheus read it)")
    for job in (d for d in docs if d["kind"] == "ScaledJob"):
        for trigger in job["spec"]["triggers"]:
            if trigger["type"] == "nats-jetstream" and trigger["metadata"].get("useHttps") != "false":
                problems.append("KEDA's trigger asks HTTPS of the plain monitoring port")
    ca = config.get("NATS_TLS_CA")
    server_secret = wanted.get(os.path.dirname(client_tls.get("cert_file", "")), ("",))[0]
    if not ca:
        problems.append("NATS_TLS_CA is not set: the stages would not verify the server")
    for d, spec in pod_specs(docs):
        for sc in spec["containers"]:
            if sc["name"] == "nats" or not any(e.get("configMapRef", {}).get("name", "").startswith("mnistflow-config")
                                               for e in sc.get("envFrom", [])):
                continue
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            mount = next((m for m in sc.get("volumeMounts", []) if ca and m["mountPath"] == os.path.dirname(ca)), None)
            secret = (vols.get(mount["name"], {}) if mount else {}).get("secret", {})
            items = {i["path"]: i["key"] for i in secret.get("items", [])}
            if not mount or secret.get("secretName") != server_secret or items.get(os.path.basename(ca or "")) != "ca.crt":
                problems.append(f"{d['kind']}/{d['metadata']['name']}: NATS_TLS_CA {ca} is not ca.crt of {server_secret} mounted there")
    return problems, wanted


def nats_tls(rendered: dict[str, list[dict]], tmp: Path) -> None:
    print("nats-tls", flush=True)
    for name, docs in rendered.items():
        files = (config_map(docs, "nats-config") or {}).get("data", {})
        if "cert_file" not in files.get("tls.conf", ""):
            continue
        problems, wanted = tls_problems(docs)
        for p in problems:
            fail(f"{name}: TLS to NATS: {p}")
        if problems:
            continue
        issued = {d["spec"]["secretName"] for d in docs if d["kind"] == "Certificate"}
        ok(f"{name}: TLS on the client port and the routes; every stage verifies the server (NATS_TLS_CA); "
           f"Secrets {', '.join(s for s, _, _ in wanted.values())} "
           + ("issued by cert-manager for every name dialled" if issued else "provided by you (names not checkable)")
           + "; monitoring stays plain HTTP for KEDA and Prometheus")
        if NATS_BIN.exists() and name == "gke-tls":
            folder = tmp / f"tls-{name}"
            ca = make_certificates(folder / "certs", {s: (h, c) for s, h, c in wanted.values()})
            servers = NatsUnderTest(rendered, folder, name, {m: folder / "certs" / s for m, (s, _, _) in wanted.items()})
            try:
                error = servers.test_config()
                health = None if error else servers.start()
                if error or not health or health.get("status") != "ok":
                    fail(f"{name}: the servers with TLS did not become healthy: {error or servers.log(0)}")
                    continue
                admin = servers.secret["NATS_ADMIN_PASSWORD"]
                tls_answer = servers.connect("admin", admin, ca=ca)
                plain = servers.connect("admin", admin)
                routes = [len((servers.get(i, "/routez") or {}).get("routes", [])) for i in range(servers.replicas)]
                if b"PONG" in tls_answer and b"PONG" not in plain and all(routes):
                    ok(f"{name}: three servers with its nats-config and certificates made here form one JetStream "
                       f"cluster over TLS routes (routes per server {routes}); a client verifying the CA gets PONG, "
                       f"a clear-text one gets none ({plain.strip()[:60]!r})")
                else:
                    fail(f"{name}: TLS client {tls_answer[:80]!r}, clear-text client {plain[:80]!r}, routes {routes}")
            finally:
                servers.stop()


def listen_port(container: dict, env: dict[str, str]) -> dict[int, str]:
    """containerPort -> the variable that makes the service listen there."""
    name = binary_name(container)
    ports: dict[int, str] = {}
    if name in ("web", "inference"):
        var = f"{name.upper()}_PORT"
        if var in env:
            ports[int(env[var])] = var
    addr_var = {"web": "WEB_METRICS_ADDR", "downloader": "DOWNLOADER_METRICS_ADDR", "feedback": "FEEDBACK_ADDR"}.get(name)
    if addr_var and (name != "downloader" or env.get("DOWNLOADER_MODE") == "service"):
        addr = env.get(addr_var, "")
        if ":" in addr:
            ports[int(addr.rsplit(":", 1)[1])] = addr_var
    return ports


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps/Secrets, then env (which wins)."""
    maps = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            env.update(maps[("Secret", source["secretRef"]["name"])].get("stringData", {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["secretKeyRef"]
            secret = maps.get(("Secret", ref["name"]))
            if secret and ref["key"] in secret.get("stringData", {}):
                env[e["name"]] = secret["stringData"][ref["key"]]
    return env


def ports(rendered: dict[str, list[dict]]) -> None:
    print("ports", flush=True)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    problems = 0
    for name, docs in rendered.items():
        for d, spec in pod_specs(docs):
            for c in spec["containers"]:
                what = f"{name}: {d['kind']}/{d['metadata']['name']}"
                image = c["image"]
                if "mnistflow/" in image and not image.split("@")[0].endswith(f":{version}"):
                    fail(f"{what}: image {image} is not tagged with the workspace version {version}")
                    problems += 1
                listens = listen_port(c, container_env(docs, c))
                named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
                for p in c.get("ports", []):
                    if c["name"] != "nats" and p["containerPort"] not in listens:
                        fail(f"{what}: containerPort {p['containerPort']} is not where the service listens ({listens})")
                        problems += 1
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    probe = (c.get(kind) or {}).get("httpGet")
                    if probe:
                        port = named.get(probe["port"], probe["port"])
                        if port not in named.values():
                            fail(f"{what}: {kind} port {probe['port']} is no declared containerPort")
                            problems += 1
    if not problems:
        ok(f"container and probe ports match the configured listen ports; images tagged {version}")


def binary_name(container: dict) -> str:
    """The binary a container runs: its command's, else the one named like it (each image's entrypoint)."""
    command = container.get("command") or []
    return command[0].rsplit("/", 1)[-1] if command else container["name"]


def serving_path_problems(docs: list[dict]) -> list[str]:
    """Issue 14 item 3: the pods that parse untrusted images (inference serving) cannot
    write the store, and model.promote is executed elsewhere: a promoter Deployment
    (the inference binary with INFERENCE_ROLE=promoter) exists, and serving inference
    runs without the in-process promoter and with its store volume read-only."""
    problems = []
    promoters, serving = 0, 0
    for d, spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            if binary_name(c) != "inference":
                continue
            env = container_env(docs, c)
            what = f"{d['kind']}/{d['metadata']['name']}"
            if env.get("INFERENCE_ROLE") == "promoter":
                promoters += d["kind"] == "Deployment"
                continue
            serving += 1
            if env.get("INFERENCE_PROMOTER", "true").lower() not in ("false", "0", "no", "off"):
                problems.append(f"{what}: serving inference runs the promoter (INFERENCE_PROMOTER is not false)")
            for m in c.get("volumeMounts", []):
                claim = volumes.get(m["name"], {}).get("persistentVolumeClaim")
                if claim is not None and not (m.get("readOnly") and claim.get("readOnly")):
                    problems.append(f"{what}: store volume {m['name']} at {m['mountPath']} is writable "
                                    "(volumeMount and persistentVolumeClaim both need readOnly: true)")
    if serving and not promoters:
        problems.append("no promoter Deployment (the inference binary with INFERENCE_ROLE=promoter) executes model.promote")
    return problems + signing_problems(docs)


SIGNING_SECRET = "mnistflow-model-signing"


def mounted_from(spec: dict, container: dict, path: str) -> dict | None:
    """The volume a path in the container lies on (None when on no volume)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if path == mount or path.startswith(mount + "/"):
            return volumes.get(m["name"])
    return None


def secrets_of(volume: dict) -> set[str]:
    """The Secrets a volume exposes (a secret volume, or a projected one's sources)."""
    names = {volume["secret"]["secretName"]} if "secret" in volume else set()
    for source in (volume.get("projected") or {}).get("sources", []):
        if "secret" in source:
            names.add(source["secret"]["name"])
    return names


def signing_problems(docs: list[dict]) -> list[str]:
    """Issue 14 item 3, signed versions: the private model-signing key (Secret
    mnistflow-model-signing) reaches the trainer and the promoter, and never a
    serving inference pod, which verifies with a keyring of public keys
    (INFERENCE_TRUSTED_KEYS on a ConfigMap volume)."""
    problems = []
    for d, spec in pod_specs(docs):
        what = f"{d['kind']}/{d['metadata']['name']}"
        for c in spec["containers"]:
            binary = binary_name(c)
            env = container_env(docs, c)
            if binary == "inference" and env.get("INFERENCE_ROLE") != "promoter":
                mounted = set()
                for v in spec.get("volumes", []):
                    mounted |= secrets_of(v)
                refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                        if "secretKeyRef" in (e.get("valueFrom") or {})}
                refs |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
                if SIGNING_SECRET in mounted | refs:
                    problems.append(f"{what}: serving inference can read the private model-signing key ({SIGNING_SECRET})")
                if "INFERENCE_SIGNING_KEY" in env:
                    problems.append(f"{what}: serving inference sets INFERENCE_SIGNING_KEY")
                keys = env.get("INFERENCE_TRUSTED_KEYS")
                volume = mounted_from(spec, c, keys) if keys else None
                if not keys:
                    problems.append(f"{what}: serving inference has no keyring (INFERENCE_TRUSTED_KEYS): it would load unsigned versions")
                elif not volume or "configMap" not in volume:
                    problems.append(f"{what}: INFERENCE_TRUSTED_KEYS={keys} is not on a ConfigMap volume")
                continue
            var = {"trainer": "TRAINER_SIGNING_KEY", "inference": "INFERENCE_SIGNING_KEY"}.get(binary)
            if var is None:
                continue
            path = env.get(var)
            volume = mounted_from(spec, c, path) if path else None
            if not path or not volume or SIGNING_SECRET not in secrets_of(volume):
                problems.append(f"{what}: {binary} does not sign: {var} is not a file of the Secret {SIGNING_SECRET}")
    return problems


def serving_path(rendered: dict[str, list[dict]]) -> None:
    print("serving-path", flush=True)
    bad = 0
    for name, docs in rendered.items():
        for problem in serving_path_problems(docs):
            fail(f"{name}: {problem}")
            bad += 1
    # The check must reject what is wrong: the base with each safeguard undone.
    base = rendered.get("base", [])

    def mutated(change) -> list[dict]:
        docs = json.loads(json.dumps(base))
        for d in docs:
            change(d)
        return docs

    def writable(d: dict) -> None:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "inference":
            for m in d["spec"]["template"]["spec"]["containers"][0].get("volumeMounts", []):
                m.pop("readOnly", None)

    def no_promoter(d: dict) -> None:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "promoter":
            d["kind"] = "Removed"

    def in_process(d: dict) -> None:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "inference":
            d["spec"]["template"]["spec"]["containers"][0].setdefault("env", []).append(
                {"name": "INFERENCE_PROMOTER", "value": "true"})

    def key_in_inference(d: dict) -> None:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "inference":
            d["spec"]["template"]["spec"]["volumes"].append(
                {"name": "leak", "projected": {"sources": [{"secret": {"name": SIGNING_SECRET}}]}})

    def no_keyring(d: dict) -> None:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "inference":
            c = d["spec"]["template"]["spec"]["containers"][0]
            c["env"] = [e for e in c["env"] if e["name"] != "INFERENCE_TRUSTED_KEYS"]

    def unsigned_trainer(d: dict) -> None:
        if d["kind"] == "ScaledJob":
            c = d["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]
            c["env"] = [e for e in c["env"] if e["name"] != "TRAINER_SIGNING_KEY"]

    for label, change in [("a writable store mount", writable), ("no promoter Deployment", no_promoter),
                          ("INFERENCE_PROMOTER=true", in_process),
                          ("the signing key mounted in inference", key_in_inference),
                          ("no keyring in inference", no_keyring), ("an unsigning trainer", unsigned_trainer)]:
        if not serving_path_problems(mutated(change)):
            fail(f"serving-path check accepts the base with {label}")
            bad += 1
    if not bad:
        ok(f"{len(rendered)} renders: serving inference mounts the store read-only, leaves model.promote to the "
           "promoter Deployment, verifies with public keys only; trainer and promoter sign (rejected: a writable "
           "mount, no promoter, INFERENCE_PROMOTER=true, the signing key in inference, no keyring, an unsigning trainer)")


def backup_problems(docs: list[dict]) -> list[str]:
    """The scheduled backup (k8s/base/backup.yaml): a CronJob that never overlaps, retries
    a bounded number of times within a deadline, runs `mnistflow backup --dated` as the
    read-only NATS identity `backup`, reads the store through a read-only mount (or a
    bucket) and writes into a claim of its own."""
    jobs = [d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "backup"]
    if not jobs:
        return ["no CronJob/backup"]
    d = jobs[0]
    problems = []
    spec, job = d["spec"], d["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"concurrencyPolicy is {spec.get('concurrencyPolicy')!r}, not Forbid (two backups at once)")
    if job.get("backoffLimit") is None or job.get("activeDeadlineSeconds") is None:
        problems.append("the Job template needs backoffLimit and activeDeadlineSeconds")
    c = pod["containers"][0]
    command = (c.get("command") or []) + (c.get("args") or [])
    if command[:2] != ["/usr/local/bin/mnistflow", "backup"] or "--dated" not in command:
        problems.append(f"runs {command}, not /usr/local/bin/mnistflow backup --dated PARENT")
    env = container_env(docs, c)
    if env.get("NATS_USER") != "backup":
        problems.append(f"NATS_USER is {env.get('NATS_USER')!r}, not the read-only identity backup")
    claims = {d_["metadata"]["name"] for d_ in docs if d_["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    store_url = env.get("STORE_URL", "")
    if not re.match(r"^(gs|s3)://", store_url):
        m = mounts.get(store_url.removeprefix("file://"))
        claim = volumes.get(m["name"], {}).get("persistentVolumeClaim") if m else None
        if not claim or claim.get("claimName") not in claims:
            problems.append(f"no mount of an existing claim at the store path {store_url}")
        elif not (m.get("readOnly") and claim.get("readOnly")):
            problems.append("the store is mounted writable (volumeMount and persistentVolumeClaim both need readOnly: true)")
    parent = command[command.index("--dated") + 1] if "--dated" in command[:-1] else ""
    m = mounts.get(parent)
    claim = volumes.get(m["name"], {}).get("persistentVolumeClaim") if m else None
    if not claim or claim.get("claimName") not in claims or m.get("readOnly"):
        problems.append(f"--dated {parent!r} is not a writable mount of an existing claim")
    return problems


def backup(rendered: dict[str, list[dict]]) -> None:
    print("backup", flush=True)
    bad = 0
    for name, docs in rendered.items():
        for problem in backup_problems(docs):
            fail(f"{name}: CronJob/backup: {problem}")
            bad += 1
    if not bad:
        ok(f"{len(rendered)} renders: CronJob/backup (Forbid, bounded retries and deadline) runs mnistflow backup "
           "--dated as NATS user backup, the store read-only, into its own claim")


def store(rendered: dict[str, list[dict]]) -> None:
    print("store", flush=True)
    reads = code_env_reads()
    readers = {f.split("/")[0] for f in reads.get("STORE_URL", set())}
    problems = 0
    for name, docs in rendered.items():
        claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
        for d, spec in pod_specs(docs):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"]:
                if binary_name(c) not in readers:
                    continue
                env = container_env(docs, c)
                url = env.get("STORE_URL", "")
                # Serving inference reads only (serving_path checks its mount is read-only).
                read_only = binary_name(c) == "inference" and env.get("INFERENCE_ROLE") != "promoter"
                what = f"{name}: {d['kind']}/{d['metadata']['name']} (STORE_URL={url})"
                mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
                store_mounts = [m for m in c.get("volumeMounts", [])
                                if "persistentVolumeClaim" in volumes.get(m["name"], {})]
                if re.match(r"^(gs|s3)://", url):
                    if store_mounts:
                        fail(f"{what}: mounts {store_mounts[0]['mountPath']} though the store is a bucket")
                        problems += 1
                    continue
                path = url.removeprefix("file://")
                mount = mounts.get(path)
                claim = (volumes.get(mount["name"], {}) if mount else {}).get("persistentVolumeClaim", {}).get("claimName")
                if not path.startswith("/") or not claim or claim not in claims or (mount.get("readOnly") and not read_only):
                    fail(f"{what}: no {'' if read_only else 'writable '}mount of an existing claim at the store path")
                    problems += 1
    if not problems:
        ok(f"stages reading STORE_URL ({', '.join(sorted(readers))}) get a store volume (writable but for serving "
           "inference), or none with a bucket")


def gateway(rendered: dict[str, list[dict]]) -> None:
    """The Gateway API objects fit together as GKE would wire them (no API server here)."""
    print("gateway", flush=True)
    for name, docs in rendered.items():
        gateways = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Gateway"}
        if not gateways:
            continue
        problems: list[str] = []
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        routes = [d for d in docs if d["kind"] == "HTTPRoute"]
        namespaces = {d["metadata"].get("namespace") for d in docs
                      if d["apiVersion"].startswith(("gateway.networking.k8s.io/", "networking.gke.io/"))
                      or d["kind"] == "Service"}
        if len(namespaces) != 1 or None in namespaces:
            problems.append(f"Services, Gateway API and GKE objects must share one namespace (found {sorted(map(str, namespaces))})")
        for gw_name, gw in gateways.items():
            annotations = gw["metadata"].get("annotations") or {}
            listeners = {entry["name"]: entry for entry in gw["spec"].get("listeners", [])}
            addresses = gw["spec"].get("addresses") or []
            if not annotations.get("networking.gke.io/certmap"):
                problems.append(f"Gateway/{gw_name}: no networking.gke.io/certmap annotation (the HTTPS listener would have no certificate)")
            if any((entry.get("tls") or {}).get("certificateRefs") for entry in listeners.values()):
                problems.append(f"Gateway/{gw_name}: tls.certificateRefs beside the certmap annotation (GKE refuses both)")
            if [a.get("type") for a in addresses] != ["NamedAddress"]:
                problems.append(f"Gateway/{gw_name}: expected one NamedAddress (the reserved static IP), found {addresses}")
            if not any(entry["protocol"] == "HTTPS" and entry["port"] == 443 for entry in listeners.values()):
                problems.append(f"Gateway/{gw_name}: no HTTPS listener on 443")
        served = []
        for route in routes:
            what = f"HTTPRoute/{route['metadata']['name']}"
            protocols = set()
            for ref in route["spec"].get("parentRefs", []):
                gw = gateways.get(ref.get("name"))
                if not gw:
                    problems.append(f"{what}: parentRef {ref.get('name')} is no Gateway here")
                    continue
                listeners = {entry["name"]: entry for entry in gw["spec"]["listeners"]}
                section = ref.get("sectionName")
                if section and section not in listeners:
                    problems.append(f"{what}: Gateway/{ref['name']} has no listener {section}")
                    continue
                protocols |= {entry["protocol"] for n, entry in listeners.items() if section in (None, n)}
            for i, rule in enumerate(route["spec"].get("rules", [])):
                redirect = next((f.get("requestRedirect") or {} for f in rule.get("filters", [])
                                 if f.get("type") == "RequestRedirect"), None)
                if "HTTP" in protocols and (rule.get("backendRefs") or not redirect or redirect.get("scheme") != "https"):
                    problems.append(f"{what}: rule {i} is attached to a plain HTTP listener but does not only redirect to https")
                for ref in rule.get("backendRefs", []):
                    service = services.get(ref["name"]) if ref.get("kind", "Service") == "Service" else None
                    ports = [p["port"] for p in (service or {}).get("spec", {}).get("ports", [])]
                    if ref.get("port") not in ports:
                        problems.append(f"{what}: backendRef {ref['name']}:{ref.get('port')} is no Service port here ({ports})")
                    else:
                        served.append(ref["name"])
        if "web" not in served:
            problems.append("no HTTPRoute sends HTTPS requests to the web Service")
        for svc in served:
            if services[svc]["spec"].get("type", "ClusterIP") != "ClusterIP":
                problems.append(f"Service/{svc} is type {services[svc]['spec']['type']}: a clear-text way around the Gateway")
        pods = [(d, spec) for d, spec in pod_specs(docs)]
        for policy in [d for d in docs if d["kind"] in ("HealthCheckPolicy", "GCPBackendPolicy")]:
            what = f"{policy['kind']}/{policy['metadata']['name']}"
            target = policy["spec"]["targetRef"]
            service = services.get(target["name"]) if target.get("kind") == "Service" else None
            if not service or service["metadata"]["name"] not in served:
                problems.append(f"{what}: targetRef {target.get('kind')}/{target.get('name')} is no Service behind the Gateway")
                continue
            check = ((policy["spec"].get("default") or {}).get("config") or {}).get("httpHealthCheck")
            if policy["kind"] == "HealthCheckPolicy":
                # The pods behind the Service must answer the path: their liveness or readiness path.
                paths = {((c.get(probe) or {}).get("httpGet") or {}).get("path")
                         for d, spec in pods if d["kind"] == "Deployment"
                         and selector_matches({"matchLabels": service["spec"]["selector"]}, d["spec"]["template"]["metadata"].get("labels", {}))
                         for c in spec["containers"] for probe in ("livenessProbe", "readinessProbe")}
                if not check or check.get("requestPath") not in paths - {None}:
                    problems.append(f"{what}: health check path {(check or {}).get('requestPath')} is none of the pods' probe paths {sorted(paths - {None})}")
                if check and check.get("portSpecification", "USE_FIXED_PORT") != "USE_SERVING_PORT" and not check.get("port"):
                    problems.append(f"{what}: neither a port nor USE_SERVING_PORT")
        for problem in problems:
            fail(f"{name}: {problem}")
        if not problems:
            gw = next(iter(gateways.values()))
            ok(f"{name}: Gateway/{gw['metadata']['name']} ({gw['spec']['gatewayClassName']}, "
               f"address {gw['spec']['addresses'][0]['value']}, certmap {gw['metadata']['annotations']['networking.gke.io/certmap']}) "
               f"serves Service {', '.join(sorted(set(served)))} over HTTPS only (HTTP redirects), "
               f"health check on a probe path, Service ClusterIP")


# GKE's Filestore classes (filestore.csi.storage.gke.io). The driver declares
# fsGroupPolicy: File (kubernetes-sigs/gcp-filestore-csi-driver, the CSIDriver of
# its stable overlays; docs/kubernetes/fsgroup.md), so the kubelet applies a pod's
# fsGroup to these ReadWriteMany volumes too.
FILESTORE_CLASSES = {"standard-rwx", "premium-rwx", "enterprise-rwx", "zonal-rwx", "enterprise-multishare-rwx"}
# Persistent disk classes: the PD CSI driver applies fsGroup to its (ReadWriteOnce) volumes too;
# the backups claim uses one.
PD_CLASSES = {"standard-rwo", "premium-rwo", "balanced-rwo"}


def store_permissions(rendered: dict[str, list[dict]]) -> None:
    """On GKE the store's uid can write the Filestore share without a manual chown."""
    print("store-permissions", flush=True)
    problems = 0
    for name, docs in rendered.items():
        if not name.startswith("gke"):
            continue
        classes = {d["metadata"]["name"]: d["spec"].get("storageClassName")
                   for d in docs if d["kind"] == "PersistentVolumeClaim"}
        pods, before = 0, problems
        for d, spec in pod_specs(docs):
            claims = [v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v]
            if not claims:
                continue
            pods += 1
            what = f"{name}: {d['kind']}/{d['metadata']['name']}"
            pod_sc = spec.get("securityContext") or {}
            for claim in claims:
                if classes.get(claim) not in FILESTORE_CLASSES | PD_CLASSES:
                    fail(f"{what}: claim {claim} has class {classes.get(claim)!r}, not a Filestore or PD class known to apply fsGroup")
                    problems += 1
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = {**pod_sc, **(c.get("securityContext") or {})}
                if pod_sc.get("fsGroup") is None or sc.get("runAsGroup") != pod_sc.get("fsGroup") \
                        or pod_sc.get("fsGroupChangePolicy") != "OnRootMismatch" or sc.get("runAsUser") in (None, 0):
                    fail(f"{what}: container {c['name']} needs runAsUser (not 0), runAsGroup == pod fsGroup and "
                         f"fsGroupChangePolicy OnRootMismatch (has {sc.get('runAsUser')}/{sc.get('runAsGroup')}, "
                         f"fsGroup {pod_sc.get('fsGroup')}, {pod_sc.get('fsGroupChangePolicy')})")
                    problems += 1
        if problems == before:
            ok(f"{name}: " + (f"{pods} pods mounting a Filestore (backups: PD) claim get its group through fsGroup (OnRootMismatch), as non-root"
                              if pods else "no pod mounts a claim"))
    if not any(n.startswith("gke") for n in rendered):
        fail("no GKE overlay rendered")


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    if not m:
        raise ValueError(text)
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def autopilot_problems(spec: dict) -> list[str]:
    """What GKE Autopilot would change or refuse in a pod spec (GKE docs: "Resource
    requests in Autopilot", "Autopilot security capabilities"; the minimums are those
    without Pod bursting, which keeps the overlay valid before GKE 1.30.2-gke.1394000)."""
    found = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"{key} is set")
    found += [f"volume {v['name']} is a hostPath" for v in spec.get("volumes", []) if "hostPath" in v]
    total = {"cpu": 0.0, "memory": 0.0, "ephemeral-storage": 0.0}
    gpu = False
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("privileged") or sc.get("allowPrivilegeEscalation", True):
            found.append(f"{c['name']}: privileged or privilege escalation allowed")
        added = set((sc.get("capabilities") or {}).get("add", [])) - {"NET_BIND_SERVICE"}
        if added:
            found.append(f"{c['name']}: adds capabilities {sorted(added)}")
        found += [f"{c['name']}: hostPort {p['hostPort']}" for p in c.get("ports", []) if p.get("hostPort")]
        res = c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for r in total:
            if r not in requests:
                found.append(f"{c['name']}: no {r} request")
                continue
            total[r] += quantity(requests[r])
            if quantity(limits.get(r, -1)) != quantity(requests[r]):
                found.append(f"{c['name']}: {r} limit {limits.get(r)} != request {requests[r]}")
        if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
            gpu = True
            if limits.get("nvidia.com/gpu") != requests.get("nvidia.com/gpu"):
                found.append(f"{c['name']}: nvidia.com/gpu limit != request")
    cpu, mem_gib, eph = total["cpu"], total["memory"] / 2**30, total["ephemeral-storage"]
    if gpu:
        if not (spec.get("nodeSelector") or {}).get("cloud.google.com/gke-accelerator"):
            found.append("asks for nvidia.com/gpu without a cloud.google.com/gke-accelerator node selector")
    else:
        if cpu < 0.25 or round(cpu * 1000) % 250:
            found.append(f"pod CPU {cpu:g} is not a multiple of 250m of at least 250m")
        if mem_gib < 0.5:
            found.append(f"pod memory {mem_gib:g} GiB is under 512Mi")
        if cpu and not 1 <= mem_gib / cpu <= 6.5:
            found.append(f"pod memory:CPU {mem_gib / cpu:.2f} GiB per vCPU is outside 1 to 6.5")
        if cpu > 28 or mem_gib > 80:
            found.append(f"pod asks for {cpu:g} CPU / {mem_gib:g} GiB, over the general-purpose maximum (28 / 80 GiB)")
    if not 10 * 2**20 <= eph <= 10 * 2**30:
        found.append(f"pod ephemeral storage {eph / 2**20:g}Mi outside 10Mi to 10Gi")
    scratch = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in spec.get("volumes", []) if "emptyDir" in v)
    if scratch > eph:
        found.append(f"emptyDir sizeLimits ({scratch / 2**20:g}Mi) exceed the ephemeral storage request")
    return found


def autopilot(rendered: dict[str, list[dict]], out: Path) -> None:
    """The gke-autopilot* overlays, and each with components/spot-trainer added."""
    print("autopilot", flush=True)
    names = [n for n in rendered if n.startswith("gke-autopilot")]
    if not names:
        fail("no gke-autopilot overlay rendered")
    for name in names:
        problems = [f"{d['kind']}/{d['metadata']['name']}: {p}"
                    for d, spec in pod_specs(rendered[name]) for p in autopilot_problems(spec)]
        for p in problems:
            fail(f"{name}: {p}")
        if not problems:
            ok(f"{name}: {sum(1 for _ in pod_specs(rendered[name]))} pods within Autopilot's rules "
               "(limits = requests incl. ephemeral storage, CPU in 250m steps, 1-6.5 GiB per vCPU, nothing privileged or on the host)")
        # The same overlay with the trainer on Spot capacity (a temporary kustomization).
        variant = out / f"{name}+spot-trainer"
        variant.mkdir(exist_ok=True)
        rel = os.path.relpath(K8S, variant)
        (variant / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {rel}/overlays/{name}\ncomponents:\n  - {rel}/components/spot-trainer\n")
        proc = subprocess.run([tool("kubectl"), "kustomize", str(variant)], capture_output=True, text=True)
        if proc.returncode != 0:
            fail(f"{name} + components/spot-trainer: kubectl kustomize: {proc.stderr.strip()}")
            continue
        plain = {d["metadata"]["name"]: spec for d, spec in pod_specs(rendered[name]) if d["kind"] == "ScaledJob"}
        spot = {d["metadata"]["name"]: spec for d, spec in pod_specs([d for d in yaml.safe_load_all(proc.stdout) if d])
                if d["kind"] == "ScaledJob"}
        spec = spot.get("trainer", {})
        selector, tolerations = spec.get("nodeSelector") or {}, spec.get("tolerations") or []
        before = plain.get("trainer", {})
        kept = all(selector.get(k) == v for k, v in (before.get("nodeSelector") or {}).items()) and \
            all(t in tolerations for t in before.get("tolerations") or [])
        spot_toleration = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        if selector.get("cloud.google.com/gke-spot") == "true" and spot_toleration in tolerations and kept \
                and not autopilot_problems(spec):
            ok(f"{name} + components/spot-trainer: the trainer selects Spot nodes and keeps its other selectors and tolerations")
        else:
            fail(f"{name} + components/spot-trainer: trainer nodeSelector {selector}, tolerations {tolerations}")


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        value, op = labels.get(e["key"]), e["operator"]
        if op == "In" and value not in e["values"]:
            return False
        if op == "NotIn" and value in e["values"]:
            return False
        if op == "Exists" and e["key"] not in labels:
            return False
        if op == "DoesNotExist" and e["key"] in labels:
            return False
    return True


class Endpoint:
    def __init__(self, name: str, ip: str, namespace: str | None = None, labels: dict | None = None):
        self.name, self.ip, self.namespace, self.labels = name, ip, namespace, labels or {}

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def peer_matches(peer: dict, policy_ns: str, ep: Endpoint) -> bool:
    import ipaddress

    if "ipBlock" in peer:
        # Matched against every address, pods' included (they have theirs in 10.8.0.0/16
        # here): a policy that admits pods by IP range is evaluated as a CNI would.
        ip = ipaddress.ip_address(ep.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(x) for x in block.get("except", []))
    if ep.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], ep.ns_labels()):
            return False
    elif ep.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], ep.labels)


def port_matches(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == protocol and p.get("port") == port for p in ports)


def allowed(policies: list[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str) -> bool:
    for direction, me, other, peers_key in (("Egress", src, dst, "to"), ("Ingress", dst, src, "from")):
        if me.namespace != "mnistflow":
            continue  # only our namespace is governed by these policies
        selecting = [p for p in policies if selector_matches(p["spec"]["podSelector"], me.labels)
                     and direction in p["spec"].get("policyTypes", ["Ingress"])]
        if not selecting:
            continue
        rules = [r for p in selecting for r in p["spec"].get(direction.lower(), [])]
        if not any(port_matches(r, port, protocol) and (not r.get(peers_key) or any(
                peer_matches(peer, "mnistflow", other) for peer in r[peers_key])) for r in rules):
            return False
    return True


def flows(rendered: dict[str, list[dict]]) -> None:
    print("flows", flush=True)
    for name, docs in rendered.items():
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        pods: dict[str, Endpoint] = {}
        for i, (d, spec) in enumerate(pod_specs(docs)):
            tpl = (d["spec"]["jobTargetRef"]["template"] if d["kind"] == "ScaledJob"
                   else d["spec"]["jobTemplate"]["spec"]["template"] if d["kind"] == "CronJob" else d["spec"]["template"])
            key = f"{d['metadata']['name']}-{d['kind'].lower()}"
            pods[key] = Endpoint(key, f"10.8.0.{i + 10}", "mnistflow", tpl["metadata"].get("labels", {}))
        pods["client"] = Endpoint("a pod labelled inference-client", "10.8.0.99", "mnistflow",
                                  {"mnistflow.io/inference-client": "true"})
        pods["other"] = Endpoint("an unlabelled pod", "10.8.0.98", "mnistflow", {})
        ext = {
            "keda": Endpoint("keda-operator", "10.8.1.1", "keda", {"app": "keda-operator"}),
            "prometheus": Endpoint("prometheus", "10.8.1.2", "gmp-system", {"app": "collector"}),
            "dns": Endpoint("kube-dns", "10.8.1.3", "kube-system", {"k8s-app": "kube-dns"}),
            "elsewhere": Endpoint("a pod in another namespace", "10.8.1.4", "default", {}),
            "internet": Endpoint("the internet", "151.101.1.1"),
            "private": Endpoint("a private address", "10.1.2.3"),
            "metadata": Endpoint("the metadata server (169.254.169.254)", "169.254.169.254"),
            "nodelocaldns": Endpoint("NodeLocal DNSCache (169.254.20.10)", "169.254.20.10"),
        }
        # Cloud DNS for GKE answers on the metadata server's address.
        resolvers = [ext["dns"], ext["metadata"], ext["nodelocaldns"]]
        bucket = bool(re.match(r"^(gs|s3)://", (config_map(docs, "mnistflow-config") or {}).get("data", {}).get("STORE_URL", "")))
        # The backup CronJob is held to a stage's flows: NATS, DNS, a bucket store's APIs, nothing else.
        stages = [k for k in pods if k.split("-")[0] in ("downloader", "trainer", "inference", "web", "backup")]
        expect = []  # (src, dst, port, protocol, allowed?)
        for k in stages:
            expect.append((pods[k], pods["nats-statefulset"], 4222, "TCP", True))
            expect.append((pods[k], pods["nats-statefulset"], 8222, "TCP", False))
            expect.append((pods[k], ext["metadata"], 80, "TCP", bucket and not k.startswith("web")))
            expect.append((pods[k], ext["private"], 53, "UDP", False))
            expect.append((pods[k], ext["internet"], 53, "UDP", False))
            online = k.startswith("downloader") or (bucket and not k.startswith("web"))
            expect.append((pods[k], ext["internet"], 443, "TCP", online))
            expect.append((pods[k], ext["private"], 443, "TCP", False))
            expect.append((pods[k], ext["elsewhere"], 8080, "TCP", False))
            expect.append((ext["elsewhere"], pods[k], 9102, "TCP", False))
            expect.append((ext["internet"], pods[k], 9102, "TCP", False))
        for k in [k for k in stages if k.startswith("downloader")]:
            expect.append((pods[k], ext["internet"], 80, "TCP", True))
            expect.append((pods[k], ext["internet"], 22, "TCP", False))
        # Google's load balancers reach the web pods directly (container-native load
        # balancing) from these ranges; with a Gateway, nobody else may.
        gateway = any(d["kind"] == "Gateway" for d in docs)
        for lb in (Endpoint("Google's LB proxies (35.191.0.0/16)", "35.191.3.4"),
                   Endpoint("Google's health checks (130.211.0.0/22)", "130.211.1.2")):
            expect += [(lb, pods["web-deployment"], 8080, "TCP", True), (lb, pods["web-deployment"], 9102, "TCP", False)]
        expect += [
            (ext["internet"], pods["web-deployment"], 8080, "TCP", not gateway),
            (ext["internet"], pods["inference-deployment"], 8080, "TCP", False),
            (ext["internet"], pods["nats-statefulset"], 4222, "TCP", False),
            (ext["keda"], pods["nats-statefulset"], 8222, "TCP", True),
            (ext["keda"], pods["nats-statefulset"], 4222, "TCP", False),
            (ext["prometheus"], pods["nats-statefulset"], 8222, "TCP", True),
            (ext["prometheus"], pods["inference-deployment"], 8080, "TCP", True),
            (ext["prometheus"], pods["web-deployment"], 9102, "TCP", True),
            (ext["prometheus"], pods["downloader-deployment"], 9102, "TCP", True),
            (ext["elsewhere"], pods["nats-statefulset"], 4222, "TCP", False),
            (ext["elsewhere"], pods["inference-deployment"], 8080, "TCP", False),
            (pods["client"], pods["inference-deployment"], 8080, "TCP", True),
            (pods["web-deployment"], pods["inference-deployment"], 8080, "TCP", False),
            (pods["other"], pods["nats-statefulset"], 4222, "TCP", False),
            (pods["other"], pods["inference-deployment"], 8080, "TCP", False),
            (pods["nats-statefulset"], ext["internet"], 443, "TCP", False),
            # The feedback stage: NATS out, Prometheus in, nothing else.
            (pods["feedback-deployment"], pods["nats-statefulset"], 4222, "TCP", True),
            (pods["feedback-deployment"], ext["internet"], 443, "TCP", bucket),
            (ext["prometheus"], pods["feedback-deployment"], 9105, "TCP", True),
            (ext["internet"], pods["feedback-deployment"], 9105, "TCP", False),
            (pods["web-deployment"], pods["feedback-deployment"], 9105, "TCP", False),
        ]
        for k in stages + ["nats-statefulset"]:
            expect += [(pods[k], r, 53, proto, True) for r in resolvers for proto in ("UDP", "TCP")]
        wrong = [(s, d, port, proto, want) for s, d, port, proto, want in expect
                 if allowed(policies, s, d, port, proto) != want]
        for s, d, port, proto, want in wrong:
            fail(f"{name}: {s.name} -> {d.name}:{port}/{proto} should be {'allowed' if want else 'denied'}")
        if not wrong:
            n_allow = sum(1 for e in expect if e[4])
            ok(f"{name}: {len(policies)} NetworkPolicies allow {n_allow} required flows and deny {len(expect) - n_allow} others"
               + (" (bucket store: HTTPS egress for its users)" if bucket else ""))


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.handle = open(log, "w")
        self.child = subprocess.Popen(args, env=env, stdout=self.handle, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        self.handle.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def wait(self, timeout: float) -> int | None:
        try:
            return self.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        self.handle.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def run(rendered: dict[str, list[dict]], nats_server: NatsUnderTest, tmp: Path) -> None:
    print("run (target/debug binaries with the pods' environment)", flush=True)
    docs = rendered["base"]
    store = tmp / "store"
    store.mkdir()
    mnist = Path(os.environ.get("MNIST_DIR", ROOT.parent / "shared" / "mnist"))
    workloads = {(d["kind"], d["metadata"]["name"]): (d, spec) for d, spec in pod_specs(docs)}
    base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    # The PodMonitors of any overlay must find metrics where they look.
    monitors = [d for docs_ in rendered.values() for d in docs_ if d["kind"] == "PodMonitor"]

    def env_for(kind: str, name: str, overrides: dict[str, str]) -> tuple[dict, dict, dict[str, str], dict[int, int]]:
        d, spec = workloads[(kind, name)]
        c = spec["containers"][0]
        env = container_env(docs, c)
        # The cluster's addresses become this machine's: NATS on its loopback port, the
        # store volume a temporary directory, the service ports free loopback ports.
        env["NATS_URL"] = nats_server.urls()
        if "STORE_URL" in env:
            env["STORE_URL"] = str(store)
        if "DOWNLOADER_TMP_DIR" in env:
            env["DOWNLOADER_TMP_DIR"] = str(tmp)
        # Secret and ConfigMap volumes (the model-signing key, the keyring) become
        # directories holding their keys; paths into them follow.
        objects = {(o["kind"], o["metadata"]["name"]): o for o in docs if o["kind"] in ("ConfigMap", "Secret")}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            v = volumes.get(m["name"], {})
            source = ("Secret", v["secret"]["secretName"]) if "secret" in v else (
                ("ConfigMap", v["configMap"]["name"]) if "configMap" in v else None)
            if source is None or source not in objects:
                continue
            local = tmp / "volumes" / kind / name / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            for key, value in (objects[source].get("stringData") or objects[source].get("data") or {}).items():
                (local / key).write_text(value)
                (local / key).chmod(0o600)
            for var, value in env.items():
                if value == m["mountPath"] or value.startswith(m["mountPath"].rstrip("/") + "/"):
                    env[var] = str(local) + value[len(m["mountPath"].rstrip("/")):]
        mapping = {}
        for container_port, var in listen_port(c, env).items():
            host = free_port()
            mapping[container_port] = host
            env[var] = f"127.0.0.1:{host}" if var.endswith("_ADDR") else str(host)
            address_var = var.replace("_PORT", "_ADDRESS")
            if address_var != var and address_var in env:
                env[address_var] = "127.0.0.1"
        env.update(overrides)
        return d, spec, {**base_env, **env}, mapping

    def binary(c: dict) -> Path | None:
        path = ROOT / "target" / "debug" / binary_name(c)
        if not path.exists():
            fail(f"{path.relative_to(ROOT)} missing (k8s/check builds it; MNISTFLOW_K8S_RUN=0 skips this section)")
            return None
        return path

    # 1. The downloader Job, from a file:// mirror instead of the internet.
    d, spec, env, _ = env_for("Job", "downloader", {"DOWNLOADER_MIRRORS": f"file://{mnist}/"})
    exe = binary(spec["containers"][0])
    if exe:
        t = time.monotonic()
        p = Proc([str(exe)], env, tmp / "downloader-job.log")
        code = p.wait(120)
        manifests = list(store.glob("datasets/mnist/*/manifest.json"))
        if code == 0 and manifests:
            ok(f"Job/downloader: stored MNIST from a file:// mirror and exited 0 ({time.monotonic() - t:.1f} s)")
        else:
            fail(f"Job/downloader: exit {code}, {len(manifests)} manifest(s)\n{p.tail()}")
        p.kill()

    # 2. The trainer Job (the ScaledJob's template) takes the train.request the
    #    downloader published (DOWNLOADER_AUTO_TRAIN), with a short time limit.
    d, spec, env, _ = env_for("ScaledJob", "trainer", {"TRAINER_MAX_MINUTES": "0.1"})
    exe = binary(spec["containers"][0])
    if exe and list(store.glob("datasets/mnist/*/manifest.json")):
        t = time.monotonic()
        p = Proc([str(exe)], env, tmp / "trainer-job.log")
        code = p.wait(300)
        versions = list(store.glob("models/mnist-cnn/*/metadata.json"))
        if code == 0 and versions:
            ok(f"ScaledJob/trainer: consumed the train.request, published a version, exited 0 ({time.monotonic() - t:.1f} s)")
        else:
            fail(f"ScaledJob/trainer: exit {code}, {len(versions)} version(s)\n{p.tail()}")
        p.kill()

    # 3. The backup CronJob's command as its pod runs it (NATS user backup, the
    #    read-only identity), its claim a temporary directory: after the downloader
    #    and the trainer, the four streams are copied (the events stream holds their
    #    events) and the store holds a version.
    d, spec, env, _ = env_for("CronJob", "backup", {})
    c = spec["containers"][0]
    exe = binary(c)
    if exe:
        backups = tmp / "backups"
        backups.mkdir()
        paths = {m["mountPath"]: str(backups) for m in c.get("volumeMounts", []) if m["name"] == "backups"}
        args = [paths.get(a, a) for a in c.get("args", [])]
        t = time.monotonic()
        p = Proc([str(exe), *args], env, tmp / "backup-job.log")
        code = p.wait(120)
        made = sorted(backups.glob("*/backup.json"))
        summary = json.loads(made[0].read_text()) if made else {}
        streams = summary.get("streams", {})
        versions = [o["key"] for o in summary.get("objects", []) if o["key"].endswith("/metadata.json")]
        # (The work queues may be empty by now: the trainer took its request.)
        if code == 0 and len(made) == 1 and len(streams) == 4 and streams.get("MNIST_EVENTS") and versions:
            ok(f"CronJob/backup: as NATS user {env.get('NATS_USER')}, {made[0].parent.name}/ holds the four streams "
               f"({', '.join(f'{k} {v}' for k, v in streams.items())}) and {len(summary['objects'])} objects "
               f"({time.monotonic() - t:.1f} s)")
        else:
            fail(f"CronJob/backup: exit {code}, {len(made)} backup(s), streams {streams}, versions {versions}\n{p.tail()}")
        p.kill()

    # 4. Every Deployment: probes answer, SIGTERM drains within the grace period.
    for (kind, name), (d, spec) in sorted(workloads.items()):
        if kind != "Deployment":
            continue
        d, spec, env, mapping = env_for(kind, name, {})
        c = spec["containers"][0]
        exe = binary(c)
        if not exe:
            continue
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        t = time.monotonic()
        p = Proc([str(exe)], env, tmp / f"{name}.log")
        try:
            live = (c.get("livenessProbe") or {}).get("httpGet")
            url = lambda probe: f"http://127.0.0.1:{mapping[named.get(probe['port'], probe['port'])]}{probe['path']}"
            deadline = time.monotonic() + 60
            status = 0
            while time.monotonic() < deadline and p.child.poll() is None:
                status = http_status(url(live))
                if status == 200:
                    break
                time.sleep(0.2)
            if status != 200:
                fail(f"Deployment/{name}: liveness {live['path']} never answered 200 (last {status})\n{p.tail()}")
                continue
            answers = [f"{live['path']} 200 after {time.monotonic() - t:.1f} s"]
            labels = d["spec"]["template"]["metadata"].get("labels", {})
            for endpoint in [e for m in monitors if selector_matches(m["spec"]["selector"], labels)
                             for e in m["spec"]["podMetricsEndpoints"]]:
                status = http_status(url({"port": endpoint["port"], "path": endpoint.get("path", "/metrics")}))
                if status != 200:
                    fail(f"Deployment/{name}: PodMonitor endpoint {endpoint['port']}{endpoint.get('path')} answered {status}")
                answers.append(f"{endpoint.get('path', '/metrics')} {status}")
            ready = (c.get("readinessProbe") or {}).get("httpGet")
            if ready:
                status = http_status(url(ready))
                if status in (0, 404):
                    fail(f"Deployment/{name}: readiness {ready['path']} answered {status}")
                    continue
                answers.append(f"{ready['path']} {status}")
            grace_s = spec.get("terminationGracePeriodSeconds", 30)
            sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            t_stop = time.monotonic()
            p.child.send_signal(15)
            code = p.wait(grace_s - sleep)
            stopped = time.monotonic() - t_stop
            if code == 0:
                ok(f"Deployment/{name}: {', '.join(answers)}; SIGTERM -> exit 0 in {stopped:.1f} s "
                   f"(grace {grace_s} s - preStop {sleep} s)")
            else:
                fail(f"Deployment/{name}: on SIGTERM exit {code} after {stopped:.1f} s (limit {grace_s - sleep} s)\n{p.tail()}")
        finally:
            p.kill()


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass",
                  "PriorityClass", "PersistentVolume"}


def namespaces(rendered: dict[str, list[dict]]) -> None:
    """Every namespaced object lands in mnistflow: a component's object without a
    namespace would go to kubectl's current one (a NetworkPolicy or PodMonitor
    there governs nothing of ours)."""
    print("namespaces", flush=True)
    wrong = [(name, d) for name, docs in rendered.items() for d in docs
             if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != "mnistflow"]
    for name, d in wrong:
        fail(f"{name}: {d['kind']}/{d['metadata']['name']} is in namespace {d['metadata'].get('namespace')!r}, not mnistflow")
    if not wrong:
        ok(f"every namespaced object of {len(rendered)} renders is in mnistflow")


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container(docs: list[dict], kind: str, name: str) -> dict:
    return find(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def break_flows(r: dict) -> None:
    # Admits the pods' whole range by IP: web -> inference (which must be denied) gets in.
    policy = next(d for d in r["base"] if d["kind"] == "NetworkPolicy"
                  and selector_matches(d["spec"]["podSelector"], {"app.kubernetes.io/name": "inference"})
                  and "Ingress" in d["spec"].get("policyTypes", ["Ingress"]))
    policy["spec"].setdefault("ingress", []).append(
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 8080}]})


def autopilot_in_tmp(rendered: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="mnistflow-k8s-self-test-") as tmp:
        autopilot(rendered, Path(tmp))


def schema_in_tmp(rendered: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="mnistflow-k8s-self-test-") as tmp:
        schema({"base": rendered["base"]}, Path(tmp))


SELF_TESTS = {
    "schema": (lambda r: find(r["base"], "Deployment", "inference")["spec"].update(replica=2), schema_in_tmp),
    "env": (lambda r: config_map(r["base"], "mnistflow-config")["data"].update(INFERENCE_NO_SUCH_KNOB="1"),
            lambda r: env(r)),
    "grace": (lambda r: find(r["base"], "Deployment", "inference")["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=1), lambda r: grace(r)),
    "ports": (lambda r: container(r["base"], "Deployment", "inference")["ports"][0].update(containerPort=9999),
              lambda r: ports(r)),
    "store": (lambda r: container(r["base"], "Deployment", "inference").update(volumeMounts=[]), lambda r: store(r)),
    "store-permissions": (lambda r: find(r["gke"], "Deployment", "inference")["spec"]["template"]["spec"].update(
        securityContext={"runAsUser": 0}), lambda r: store_permissions(r)),
    "autopilot": (lambda r: container(r["gke-autopilot"], "Deployment", "web").update(
        securityContext={"privileged": True}), autopilot_in_tmp),
    "gateway": (lambda r: [d for d in r["gke-https"] if d["kind"] == "HTTPRoute"][0]["spec"]["rules"][0][
        "backendRefs"][0].update(name="no-such-service"), lambda r: gateway(r)),
    "flows": (break_flows, lambda r: flows(r)),
    "backup (a writable store mount)": (
        lambda r: [m.pop("readOnly") for m in find(r["gke"], "CronJob", "backup")["spec"]["jobTemplate"]["spec"][
            "template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "store"], lambda r: backup(r)),
    "backup (overlapping runs)": (lambda r: find(r["base"], "CronJob", "backup")["spec"].update(
        concurrencyPolicy="Allow"), lambda r: backup(r)),
    "nats-cluster": (lambda r: find(r["gke"], "StatefulSet", "nats")["spec"].update(replicas=2),
                     lambda r: nats_cluster_shape(r)),
    "nats-tls": (lambda r: [d for d in r["gke-tls"] if d["kind"] == "Certificate"
                            and d["metadata"]["name"] == "nats-routes"][0]["spec"]["dnsNames"].pop(0),
                 lambda r: [fail(f"gke-tls: {p}") for p in tls_problems(r["gke-tls"])[0]]),
}


def self_test() -> int:
    """Each check must reject a deliberately broken copy of the rendered manifests."""
    import contextlib
    import copy
    import io

    out = Path(tempfile.mkdtemp(prefix="mnistflow-k8s-self-test-"))
    with contextlib.redirect_stdout(io.StringIO()):
        rendered = render(out)
    shutil.rmtree(out, ignore_errors=True)
    if failures:
        return 1
    print("self-test (each check must reject a broken copy)", flush=True)
    missed = []
    for name, (breaker, check) in SELF_TESTS.items():
        broken = copy.deepcopy(rendered)
        try:
            breaker(broken)
        except Exception as e:  # the manifests changed shape: the self-test must follow
            fail(f"{name}: could not break the manifests as planned: {e!r}")
            continue
        saved = list(failures)
        failures.clear()
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                check(broken)
            except Exception as e:  # a crash is no rejection: the check must say what is wrong
                failures.append(f"crashed: {e!r}")
                missed.append(name)
        caught = list(failures)
        failures[:] = saved
        if caught and name not in missed:
            ok(f"{name}: rejected ({caught[0][:150]})")
        elif name not in missed:
            missed.append(name)
    for name in missed:
        fail(f"{name}: the check passed a broken copy of the manifests")
    return 1 if failures else 0


def main() -> int:
    if "--self-test" in sys.argv:
        return self_test()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0] if args else tempfile.mkdtemp(prefix="mnistflow-k8s-"))
    out.mkdir(parents=True, exist_ok=True)
    rendered = render(out)
    if "base" in rendered:
        schema(rendered, out)
        namespaces(rendered)
        same_pod()
        grace(rendered)
        env(rendered)
        ports(rendered)
        store(rendered)
        serving_path(rendered)
        backup(rendered)
        store_permissions(rendered)
        autopilot(rendered, out)
        gateway(rendered)
        flows(rendered)
        nats_cluster_shape(rendered)
        if not NATS_BIN.exists():
            fail("nats-server missing: run scripts/setup")
        else:
            with tempfile.TemporaryDirectory(prefix="mnistflow-k8s-run-") as tmp:
                nats_tls(rendered, Path(tmp))
                nats_server = NatsUnderTest(rendered, Path(tmp))
                try:
                    if nats(nats_server):
                        if "--run" in sys.argv:
                            run(rendered, nats_server, Path(tmp))
                        lame_duck(nats_server)
                finally:
                    nats_server.stop()
                if "local" in rendered:
                    (Path(tmp) / "local").mkdir()
                    single = NatsUnderTest(rendered, Path(tmp) / "local", "local")
                    try:
                        print("nats (local overlay)", flush=True)
                        error = single.test_config()
                        health = None if error else single.start()
                        if error or not health or health.get("status") != "ok":
                            fail(f"local overlay: one server with its nats-config: {error or single.log(0)}")
                        else:
                            ok("local overlay: one server with its nats-config (no cluster block) is healthy with JetStream")
                    finally:
                        single.stop()
    if failures:
        print(f"{len(failures)} manifest check(s) failed", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
