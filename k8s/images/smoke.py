#!/usr/bin/env python3
"""Runs the built images once, as Kubernetes would run them, and times each step.

Every container runs with a read-only root filesystem, a tmpfs /tmp, uid 65532,
no capabilities, no-new-privileges, and the host's network namespace, so that it
reaches only a nats-server started here on a loopback port (with user/password
auth, like the cluster's) and serves on loopback ports. With all four images:

  1. web and inference start and answer /healthz; inference is not ready (no model)
  2. the downloader (once mode) stores MNIST from a local file:// mirror and exits 0
  3. a short train.request is published (as `nats pub` would); the trainer (job
     mode) consumes it, trains, publishes and promotes a version, and exits 0
  4. inference hot-reloads it (/readyz turns 200) and classifies a real MNIST test
     digit sent as PNG, over HTTP; the web tier classifies it too, through NATS
  5. SIGTERM (podman stop) ends web and inference cleanly within their grace

With --quick (what CI runs, on images of debug binaries) step 3 only starts the
trainer: it connects, finds no request within 2 s and exits 0; inference stays
unready and step 4 is skipped. With only some images, the steps they allow.

Usage: smoke.py [--tag TAG] [--quick] [STAGE...]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NATS_SERVER = ROOT / ".tools" / "bin" / "nats-server"
MNIST = Path(os.environ.get("MNIST_DIR", ROOT.parent / "shared" / "mnist"))
USER, PASSWORD = "smoke", "smoke-password"
PODMAN = ["podman", "--runtime", "runc"]
HARDENING = [
    "--network", "host", "--read-only", "--tmpfs", "/tmp:rw,size=256m", "--user", "65532:65532",
    "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
    "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
]

timings: list[tuple[str, float]] = []
failures: list[str] = []
containers: list[str] = []


def step(name: str, started: float) -> None:
    elapsed = time.monotonic() - started
    timings.append((name, elapsed))
    print(f"  ok   {name} ({elapsed:.1f} s)", flush=True)


def fail(what: str) -> None:
    failures.append(what)
    print(f"  FAIL {what}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_http(url: str, want: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http("GET", url)[0] == want:
            return True
        time.sleep(0.2)
    return False


def env_args(env: dict[str, str]) -> list[str]:
    return [arg for k, v in env.items() for arg in ("-e", f"{k}={v}")]


def start(name: str, image: str, env: dict[str, str], volumes: list[str] = ()) -> str:
    cname = f"mnistflow-smoke-{name}-{os.getpid()}"
    cmd = PODMAN + ["run", "-d", "--name", cname] + HARDENING + env_args(env)
    for v in volumes:
        cmd += ["-v", v]
    subprocess.run(cmd + [image], check=True, capture_output=True, text=True)
    containers.append(cname)
    return cname


def run_to_end(name: str, image: str, env: dict[str, str], volumes: list[str], timeout: float) -> tuple[int, str]:
    cname = f"mnistflow-smoke-{name}-{os.getpid()}"
    cmd = PODMAN + ["run", "--rm", "--name", cname] + HARDENING + env_args(env)
    for v in volumes:
        cmd += ["-v", v]
    try:
        proc = subprocess.run(cmd + [image], capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stderr + proc.stdout
    except subprocess.TimeoutExpired as e:
        subprocess.run(PODMAN + ["rm", "-f", cname], capture_output=True)
        return -1, f"timed out after {timeout} s\n{(e.stderr or b'').decode(errors='replace')[-3000:]}"


def logs(cname: str) -> str:
    return subprocess.run(PODMAN + ["logs", cname], capture_output=True, text=True).stderr[-3000:]


def mnist_digit(index: int) -> tuple[bytes, int]:
    """The index-th MNIST test digit as an 8-bit grayscale PNG, and its label."""
    images = gzip.decompress((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    pixels = images[16 + index * 784: 16 + (index + 1) * 784]
    raw = b"".join(b"\x00" + pixels[row * 28:(row + 1) * 28] for row in range(28))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return png, labels[8 + index]


async def publish_train_request(url: str, payload: dict) -> None:
    import nats  # nats-py, installed by scripts/setup

    nc = await nats.connect(url, user=USER, password=PASSWORD, connect_timeout=5)
    try:
        ack = await nc.jetstream().publish("mnist.train.request", json.dumps(payload).encode(), timeout=5)
        print(f"       train.request stored in {ack.stream} as #{ack.seq}", flush=True)
    finally:
        await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="0.1.0")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("stages", nargs="*")
    args = parser.parse_args()
    stages = set(args.stages or ["downloader", "trainer", "inference", "web"]) - {"trainer-cuda"}
    image = {s: f"localhost/mnistflow/{s}:{args.tag}" for s in stages}
    t_all = time.monotonic()
    print("smoke run (podman, runc, read-only root, uid 65532, loopback only)", flush=True)

    with tempfile.TemporaryDirectory(prefix="mnistflow-smoke-") as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        store.mkdir()
        os.chown(store, 65532, 65532)
        port = free_port()
        nats_url = f"nats://127.0.0.1:{port}"
        server = subprocess.Popen(
            [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp / "nats"),
             "--user", USER, "--pass", PASSWORD],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        common = {"NATS_URL": nats_url, "NATS_USER": USER, "NATS_PASSWORD": PASSWORD,
                  "NATS_CONNECT_TIMEOUT_SECS": "30", "LOG_FORMAT": "json", "RUST_LOG": "info"}
        store_env = {"STORE_URL": "/var/lib/mnistflow/store"}
        store_vol = f"{store}:/var/lib/mnistflow/store"
        web_port, web_metrics_port, inf_port = free_port(), free_port(), free_port()
        try:
            started = {}
            if "web" in stages:
                t = time.monotonic()
                started["web"] = start("web", image["web"], {**common, "WEB_ADDRESS": "127.0.0.1", "WEB_PORT": str(web_port),
                                                             "WEB_METRICS_ADDR": f"127.0.0.1:{web_metrics_port}"})
                if wait_http(f"http://127.0.0.1:{web_port}/healthz", 200, 60) and wait_http(
                        f"http://127.0.0.1:{web_metrics_port}/metrics", 200, 10):
                    step("web answers /healthz, and /metrics on its own port", t)
                else:
                    fail(f"web never answered /healthz and /metrics on its own port\n{logs(started['web'])}")
            if "inference" in stages:
                t = time.monotonic()
                started["inference"] = start(
                    "inference", image["inference"],
                    {**common, **store_env, "INFERENCE_ADDRESS": "127.0.0.1", "INFERENCE_PORT": str(inf_port),
                     "INFERENCE_TORCH_THREADS": "2", "INFERENCE_POLL_SECS": "1"},
                    [store_vol],
                )
                if wait_http(f"http://127.0.0.1:{inf_port}/healthz", 200, 60):
                    step("inference answers /healthz", t)
                    status, _ = http("GET", f"http://127.0.0.1:{inf_port}/readyz")
                    if status == 200:
                        fail("inference claims to be ready with an empty store")
                    else:
                        print(f"       inference /readyz is {status} before any model exists", flush=True)
                else:
                    fail(f"inference never answered /healthz\n{logs(started['inference'])}")

            if "downloader" in stages:
                t = time.monotonic()
                code, out = run_to_end(
                    "downloader", image["downloader"],
                    {**common, **store_env, "DOWNLOADER_MODE": "once", "DOWNLOADER_MIRRORS": "file:///mirror/",
                     "DOWNLOADER_AUTO_TRAIN": "false", "DOWNLOADER_TMP_DIR": "/tmp"},
                    [store_vol, f"{MNIST}:/mirror:ro"], 180,
                )
                manifests = list(store.glob("datasets/mnist/*/manifest.json"))
                if code == 0 and manifests:
                    step("downloader stores MNIST from a file:// mirror and exits 0", t)
                else:
                    fail(f"downloader exited {code}, {len(manifests)} manifest(s)\n{out[-3000:]}")

            if "trainer" in stages and args.quick:
                t = time.monotonic()
                code, out = run_to_end(
                    "trainer", image["trainer"],
                    {**common, **store_env, "TRAINER_MODE": "job", "TRAINER_JOB_WAIT_SECS": "2",
                     "TRAINER_METRICS_ADDR": "off", "TRAINER_PROGRESS_BAR": "off"},
                    [store_vol], 120,
                )
                if code == 0:
                    step("trainer starts (libtorch linked), connects, finds no request and exits 0", t)
                else:
                    fail(f"trainer exited {code}\n{out[-3000:]}")
            elif "trainer" in stages and list(store.glob("datasets/mnist/*/manifest.json")):
                t = time.monotonic()
                asyncio.run(publish_train_request(nats_url, {
                    "epochs": 1, "max_train_examples": 12800, "force": True, "requested_by": "k8s/images/smoke.py",
                }))
                code, out = run_to_end(
                    "trainer", image["trainer"],
                    {**common, **store_env, "TRAINER_MODE": "job", "TRAINER_JOB_WAIT_SECS": "30",
                     "TRAINER_ACCURACY_FLOOR": "0", "TRAINER_THREADS": "2", "TRAINER_METRICS_ADDR": "off",
                     "TRAINER_PROGRESS_BAR": "off"},
                    [store_vol], 600,
                )
                current = store / "models" / "mnist-cnn" / "CURRENT"
                if code == 0 and current.exists():
                    step(f"trainer trains on 12,800 examples, publishes and promotes {current.read_text().strip()}, exits 0", t)
                else:
                    fail(f"trainer exited {code}, CURRENT {'exists' if current.exists() else 'missing'}\n{out[-3000:]}")

                if "inference" in started:
                    t = time.monotonic()
                    if wait_http(f"http://127.0.0.1:{inf_port}/readyz", 200, 60):
                        step("inference hot-reloads the new version (/readyz 200)", t)
                    else:
                        fail(f"inference never became ready\n{logs(started['inference'])}")
                    png, label = mnist_digit(0)
                    status, body = http("POST", f"http://127.0.0.1:{inf_port}/v1/predict", png, "image/png")
                    answer = json.loads(body or b"{}") if status == 200 else {}
                    if answer.get("digit") == label:
                        print(f"       inference /v1/predict: digit {label} -> {answer['digit']} ({answer.get('model_version')})")
                    else:
                        fail(f"inference /v1/predict on a {label}: HTTP {status} {body[:200]!r}")
                    if "web" in started:
                        status, body = http("POST", f"http://127.0.0.1:{web_port}/api/predict", png, "image/png")
                        answer = json.loads(body or b"{}") if status == 200 else {}
                        if answer.get("digit") == label:
                            print(f"       web /api/predict (over NATS): digit {label} -> {answer['digit']}")
                        else:
                            fail(f"web /api/predict on a {label}: HTTP {status} {body[:200]!r}")

            for name, cname in started.items():
                t = time.monotonic()
                proc = subprocess.run(PODMAN + ["stop", "-t", "60", cname], capture_output=True, text=True)
                code = subprocess.run(PODMAN + ["inspect", "-f", "{{.State.ExitCode}}", cname],
                                      capture_output=True, text=True).stdout.strip()
                if proc.returncode == 0 and code == "0":
                    step(f"{name} exits 0 on SIGTERM", t)
                else:
                    fail(f"{name} on SIGTERM: exit code {code}\n{logs(cname)}")
        finally:
            for cname in containers:
                subprocess.run(PODMAN + ["rm", "-f", "-t", "0", cname], capture_output=True)
            server.terminate()
            server.wait(timeout=10)
            subprocess.run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(store)], capture_output=True)

    total = time.monotonic() - t_all
    print(f"smoke run: {'passed' if not failures else f'{len(failures)} FAILED'} in {total:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
