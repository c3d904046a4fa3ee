#!/usr/bin/env python3
"""The dashboard and the alerts against what the stages really export (k8s/checks/monitoring).

  rules      the PrometheusRule's spec (components/monitoring/rules.yaml) passes
             `promtool check rules` and `promtool test rules` (rules-test.yaml: each
             alert fires on a synthetic failure and stays quiet on a healthy series);
             a copy with a misspelt metric must fail those tests
  objects    the rendered overlays carry them: gke-prometheus the PrometheusRule and the
             dashboard ConfigMap (label grafana_dashboard "1", the JSON file unchanged);
             gke-managed-prometheus a `Rules` with the same groups, and a PodMonitoring
             for each PodMonitor (same selector, port, path, interval). The schemas of
             the monitoring.googleapis.com kinds are not installable here: unverified
  live       the real stage binaries (target/debug: downloader service, trainer worker,
             inference, web) on a real nats-server, scraped every second by a real
             Prometheus (Debian's) that also loads the rules. Traffic: a download from a
             mirror that does not exist (fails on purpose), MNIST stored from a file://
             mirror, a tiny training run, predictions through inference (HTTP) and web
             (-> NATS -> inference). Then every panel query of the dashboard is evaluated
             through Prometheus' HTTP API: it must return data, and every metric and label
             it names must exist in what was scraped. Every alert expression must name
             existing metrics and labels, and Prometheus must evaluate every rule without
             error; on this stack only DownloaderFailing (the broken mirror) fires
  self-test  the same panel check on a copy of the dashboard with one metric misspelt
             must fail

Usage: monitoring.py     (the binaries must exist; k8s/checks/monitoring builds them)
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent.parent
ROOT = K8S.parent
COMPONENT = K8S / "components" / "monitoring"
RULES = COMPONENT / "rules.yaml"
RULES_TEST = COMPONENT / "rules-test.yaml"
DASHBOARD = COMPONENT / "mnistflow-dashboard.json"
KUBECTL = ROOT / ".tools" / "venv" / "bin" / "kubectl"
NATS_BIN = ROOT / ".tools" / "bin" / "nats-server"
BIN = ROOT / "target" / "debug"
MNIST = Path(os.environ.get("MNIST_DIR", ROOT.parent / "shared" / "mnist"))
# What Grafana substitutes in the queries, as the test evaluates them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "10m"}
# The alert the test provokes (a download from a mirror that does not exist).
EXPECTED_FIRING = {"DownloaderFailing"}

failures: list[str] = []


def fail(what: str) -> None:
    failures.append(what)
    print(f"  FAIL {what}", flush=True)


def ok(what: str) -> None:
    print(f"  ok   {what}", flush=True)


def rule_spec() -> dict:
    return yaml.safe_load(RULES.read_text())["spec"]


# ---------------------------------------------------------------- rules


def promtool_rules(spec: dict, tmp: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """promtool check rules, then test rules, on `spec` written as a rule file."""
    (tmp / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(RULES_TEST, tmp / "rules-test.yaml")
    check = subprocess.run(["promtool", "check", "rules", "rules.yaml"], cwd=tmp, capture_output=True, text=True)
    test = subprocess.run(["promtool", "test", "rules", "rules-test.yaml"], cwd=tmp, capture_output=True, text=True)
    return check, test


def rules() -> None:
    print("rules", flush=True)
    spec = rule_spec()
    alerts = [r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r]
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    with tempfile.TemporaryDirectory(prefix="mnistflow-rules-") as tmp:
        check, test = promtool_rules(spec, Path(tmp))
        if check.returncode == 0:
            ok(f"promtool check rules: {len(alerts)} alerts")
        else:
            fail(f"promtool check rules\n{check.stdout}{check.stderr}")
        if test.returncode == 0:
            ok(f"promtool test rules: {len(yaml.safe_load(RULES_TEST.read_text())['tests'])} cases pass")
        else:
            fail(f"promtool test rules\n{test.stdout}{test.stderr}")
        untested = sorted(set(alerts) - tested)
        if untested:
            fail(f"alerts without a case in rules-test.yaml: {', '.join(untested)}")
        # The tests must notice a rule that no longer matches what it is about.
        broken = copy.deepcopy(spec)
        for g in broken["groups"]:
            for r in g["rules"]:
                r["expr"] = r["expr"].replace("inference_model_info", "inference_model_infos")
        _, test = promtool_rules(broken, Path(tmp))
        if test.returncode != 0:
            got = next((line.strip().rstrip(",") for line in (test.stdout + test.stderr).splitlines()
                        if "alertname:" in line), "failed")
            ok(f"self-test: rules with inference_model_infos fail promtool test rules ({got})")
        else:
            fail("self-test: promtool test rules passed rules with a misspelt metric")


# ---------------------------------------------------------------- objects


def render(overlay: str) -> list[dict]:
    proc = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"{overlay}: kubectl kustomize: {proc.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def objects() -> None:
    print("objects", flush=True)
    spec = rule_spec()
    operator = render("gke-prometheus")
    managed = render("gke-managed-prometheus")
    by_kind = lambda docs, kind: [d for d in docs if d["kind"] == kind]
    rule = by_kind(operator, "PrometheusRule")
    if len(rule) == 1 and rule[0]["spec"] == spec and rule[0]["metadata"].get("labels", {}).get("release"):
        ok("gke-prometheus: PrometheusRule mnistflow with the rules, labelled release")
    else:
        fail(f"gke-prometheus: expected one PrometheusRule with rules.yaml's spec, got {len(rule)}")
    for name, docs in (("gke-prometheus", operator), ("gke-managed-prometheus", managed)):
        cms = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "mnistflow-dashboard"]
        if (len(cms) == 1 and cms[0]["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
                and json.loads(cms[0]["data"]["mnistflow-dashboard.json"]) == json.loads(DASHBOARD.read_text())):
            ok(f"{name}: ConfigMap mnistflow-dashboard (grafana_dashboard: \"1\") holds the dashboard JSON")
        else:
            fail(f"{name}: no ConfigMap mnistflow-dashboard labelled grafana_dashboard \"1\" with the dashboard JSON")
    gmp_rules = by_kind(managed, "Rules")
    if (len(gmp_rules) == 1 and gmp_rules[0]["apiVersion"] == "monitoring.googleapis.com/v1"
            and gmp_rules[0]["spec"] == spec and not by_kind(managed, "PrometheusRule")):
        ok("gke-managed-prometheus: Rules (monitoring.googleapis.com/v1) with the same groups, no PrometheusRule")
    else:
        fail("gke-managed-prometheus: expected one monitoring.googleapis.com/v1 Rules with rules.yaml's groups")
    monitors = {d["metadata"]["name"]: d["spec"] for d in by_kind(operator, "PodMonitor")}
    monitorings = {d["metadata"]["name"]: d["spec"] for d in by_kind(managed, "PodMonitoring")}
    same = lambda pm, pmg: (pm["selector"] == pmg["selector"] and
                            [(e["port"], e.get("path", "/metrics"), e.get("interval")) for e in pm["podMetricsEndpoints"]]
                            == [(e["port"], e.get("path", "/metrics"), e.get("interval")) for e in pmg["endpoints"]])
    if monitors and set(monitors) == set(monitorings) and all(same(monitors[n], monitorings[n]) for n in monitors):
        ok(f"gke-managed-prometheus: a PodMonitoring for each PodMonitor ({', '.join(sorted(monitors))}): "
           "same selector, port, path, interval")
    else:
        fail(f"PodMonitorings {sorted(monitorings)} do not match the PodMonitors {sorted(monitors)}")
    print("  --   Rules and PodMonitoring (monitoring.googleapis.com): no schema installable here, fields unverified")


# ---------------------------------------------------------------- PromQL


KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset", "inf", "nan", "atan2"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to."""
    labels = set()
    for _, group in GROUPING.findall(expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    bare = GROUPING.sub(" ", expr)
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', " ", bare)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\boffset\s+\w+", " ", bare)
    metrics = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", bare):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in KEYWORDS:
            metrics.add(word)
    return metrics, labels - {"le", "__name__"}


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def metric_names(self) -> set[str]:
        return set(self.get("/api/v1/label/__name__/values")["data"])

    def label_names(self, metric: str) -> set[str]:
        series = self.get("/api/v1/series", **{"match[]": metric})["data"]
        return {k for s in series for k in s}


def check_expr(prom: Prometheus, known: set[str], expr: str, need_data: bool) -> str | None:
    """None if `expr` is sound against the scraped data, else why not."""
    metrics, labels = names(expr)
    unknown = sorted(metrics - known)
    if unknown:
        return f"unknown metric {', '.join(unknown)}"
    have = set().union(*(prom.label_names(m) for m in metrics)) if metrics else set()
    missing = sorted(labels - have)
    if metrics and missing:
        return f"label {', '.join(missing)} on none of {', '.join(sorted(metrics))}"
    answer = prom.query(expr)
    if answer.get("status") != "success":
        return f"query error: {answer.get('error')}"
    if need_data and not answer["data"]["result"]:
        return "no data"
    return None


def dashboard_targets(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel, rows included."""
    found = []
    for panel in dashboard["panels"]:
        for p in [panel] + panel.get("panels", []):
            for t in p.get("targets", []):
                if t.get("expr"):
                    found.append((p["title"], grafana(t["expr"])))
    return found


def check_dashboard(prom: Prometheus, dashboard: dict, known: set[str]) -> list[str]:
    problems = []
    for title, expr in dashboard_targets(dashboard):
        why = check_expr(prom, known, expr, need_data=True)
        if why:
            problems.append(f"panel {title!r}: {why}: {expr}")
    return problems


# ---------------------------------------------------------------- live


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(what: str, timeout: float, condition) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    fail(f"{what} (waited {timeout:.0f} s)")
    return False


def digit_png() -> bytes:
    """The first MNIST test image as a 28x28 grayscale PNG."""
    pixels = gzip.open(MNIST / "t10k-images-idx3-ubyte.gz").read()[16:16 + 784]
    rows = b"".join(b"\x00" + pixels[y * 28:(y + 1) * 28] for y in range(28))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


async def publish(nats_url: str, subject: str, payload: dict) -> None:
    import nats  # nats-py, from scripts/setup

    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(subject, json.dumps(payload).encode())
    finally:
        await nc.close()


class Stack:
    """nats-server, the four stages and Prometheus, each a child process logging to tmp."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.children: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        child = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.children.append((name, child))
        return child

    def tail(self, name: str) -> str:
        return "\n".join((self.tmp / f"{name}.log").read_text(errors="replace").splitlines()[-10:])

    def stop(self) -> None:
        for _, child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
        for _, child in self.children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def live(tmp: Path) -> None:
    print("live (target/debug stages, nats-server, Prometheus)", flush=True)
    for b in ("downloader", "trainer", "inference", "web"):
        if not (BIN / b).exists():
            fail(f"target/debug/{b} missing (k8s/checks/monitoring builds it)")
            return
    t0 = time.monotonic()
    stack = Stack(tmp)
    try:
        run_live(stack, tmp)
    finally:
        stack.stop()
    print(f"  live part: {time.monotonic() - t0:.0f} s", flush=True)


def run_live(stack: Stack, tmp: Path) -> None:
    (tmp / "js").mkdir()
    nats = stack.spawn("nats-server", [str(NATS_BIN), "-a", "127.0.0.1", "-p", "-1", "-js",
                                       "--store_dir", str(tmp / "js"), "--ports_file_dir", str(tmp)])
    ports_file = tmp / f"nats-server_{nats.pid}.ports"
    if not wait_for("nats-server wrote its ports file", 20, ports_file.exists):
        return
    time.sleep(0.1)
    nats_url = json.loads(ports_file.read_text())["nats"][0]

    ports = {name: free_port() for name in ("downloader", "trainer", "inference", "web", "web-metrics", "prometheus",
                                                 "dead-mirror")}
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    common = {**base, "NATS_URL": nats_url, "STORE_URL": str(tmp / "store"), "LOG_FORMAT": "json", "RUST_LOG": "info"}
    stack.spawn("downloader", [str(BIN / "downloader")], {
        **common, "DOWNLOADER_MODE": "service", "DOWNLOADER_METRICS_ADDR": f"127.0.0.1:{ports['downloader']}",
        "DOWNLOADER_PROGRESS": "off", "DOWNLOADER_TMP_DIR": str(tmp), "DOWNLOADER_RETRIES": "0",
        "DOWNLOADER_MAX_DELIVER": "1", "DOWNLOADER_AUTO_TRAIN": "false",
        # MNIST from the local copy; commands may name only the (dead) http mirror.
        "DOWNLOADER_MIRRORS": f"file://{MNIST}/",
        "DOWNLOADER_ALLOWED_MIRRORS": f"http://127.0.0.1:{ports['dead-mirror']}/"})
    stack.spawn("trainer", [str(BIN / "trainer")], {
        **common, "TRAINER_MODE": "worker", "TRAINER_METRICS_ADDR": f"127.0.0.1:{ports['trainer']}",
        "TRAINER_ACCURACY_FLOOR": "0", "TRAINER_THREADS": "1", "TRAINER_PROGRESS_BAR": "off"})
    stack.spawn("inference", [str(BIN / "inference")], {
        **common, "INFERENCE_ADDRESS": "127.0.0.1", "INFERENCE_PORT": str(ports["inference"]),
        "INFERENCE_TORCH_THREADS": "1", "INFERENCE_WORKERS": "2", "INFERENCE_POLL_SECS": "1"})
    stack.spawn("web", [str(BIN / "web")], {
        **common, "WEB_ADDRESS": "127.0.0.1", "WEB_PORT": str(ports["web"]),
        "WEB_METRICS_ADDR": f"127.0.0.1:{ports['web-metrics']}"})
    targets = {"downloader": ports["downloader"], "trainer": ports["trainer"],
               "inference": ports["inference"], "web": ports["web-metrics"]}
    for name, port in targets.items():
        if not wait_for(f"{name} /metrics answers", 60, lambda p=port: http(f"http://127.0.0.1:{p}/metrics")[0] == 200):
            print(stack.tail(name))
            return

    # Prometheus scrapes every second and evaluates the rules every second.
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rule_spec(), sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                           for name, port in targets.items()],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_url = f"http://127.0.0.1:{ports['prometheus']}"
    stack.spawn("prometheus", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{ports['prometheus']}"])
    if not wait_for("Prometheus ready", 30, lambda: http(f"{prom_url}/-/ready")[0] == 200):
        print(stack.tail("prometheus"))
        return
    prom = Prometheus(prom_url)

    # Traffic. A download from a mirror nobody answers (given up at once:
    # DOWNLOADER_MAX_DELIVER=1), then MNIST from the configured file:// mirror, then a tiny run.
    t = time.monotonic()
    dead = f"http://127.0.0.1:{ports['dead-mirror']}/"
    asyncio.run(publish(nats_url, "mnist.dataset.download", {"mirrors": [dead], "auto_train": False}))
    asyncio.run(publish(nats_url, "mnist.dataset.download", {"auto_train": False}))
    if not wait_for("the data set stored", 60, lambda: any((tmp / "store").glob("datasets/mnist/*/manifest.json"))):
        print(stack.tail("downloader"))
        return
    asyncio.run(publish(nats_url, "mnist.train.request", {"max_train_examples": 2000, "epochs": 1}))
    inference = f"http://127.0.0.1:{ports['inference']}"
    if not wait_for("inference serves the trained model", 180, lambda: http(f"{inference}/readyz")[0] == 200):
        print(stack.tail("trainer"))
        print(stack.tail("inference"))
        return
    ok(f"stages up, a failed and a stored download, a model trained and loaded ({time.monotonic() - t:.0f} s)")
    png = {"Content-Type": "image/png"}
    answers = [http(f"{inference}/v1/predict", digit_png(), png)[0] for _ in range(3)]
    answers += [http(f"http://127.0.0.1:{ports['web']}/api/predict", digit_png(), png)[0] for _ in range(3)]
    if answers != [200] * 6:
        fail(f"predictions answered {answers}")
        return
    ok("3 predictions through inference (HTTP), 3 through web (NATS), all 200")
    # Prometheus has what the panels need once its data shows the last request.
    wait_for("Prometheus scraped the web predictions", 20, lambda: any(
        float(r["value"][1]) >= 3 for r in prom.query('mnistflow_web_predictions_total{outcome="ok"}')["data"]["result"]))
    time.sleep(2)

    known = prom.metric_names()
    ours = sorted(m for m in known if m.startswith(("downloader_", "trainer_", "inference_", "mnistflow_web_")))
    ok(f"Prometheus scraped {len(ours)} metric names from the four stages")

    dashboard = json.loads(DASHBOARD.read_text())
    targets_ = dashboard_targets(dashboard)
    problems = check_dashboard(prom, dashboard, known)
    for p in problems:
        fail(p)
    if not problems:
        ok(f"dashboard: all {len(targets_)} queries of {len({t for t, _ in targets_})} panels return data; "
           "every metric and label they name was scraped")

    # The same check must reject a panel whose metric is misspelt.
    broken = copy.deepcopy(dashboard)
    for panel in broken["panels"]:
        for target in panel.get("targets", []):
            target["expr"] = target["expr"].replace("inference_requests_total", "inference_request_total")
    problems = check_dashboard(prom, broken, known)
    if problems:
        ok(f"self-test: a misspelt metric fails the panel check: {problems[0][:150]}")
    else:
        fail("self-test: the dashboard with inference_request_total passed")

    spec = rule_spec()
    alerts = {r["alert"]: r["expr"] for g in spec["groups"] for r in g["rules"] if "alert" in r}
    bad = {name: why for name, expr in alerts.items() if (why := check_expr(prom, known, expr, need_data=False))}
    for name, why in bad.items():
        fail(f"alert {name}: {why}")
    if not bad:
        ok(f"alerts: all {len(alerts)} expressions evaluate and name only scraped metrics and labels")
    # Prometheus itself evaluates the rules: no errors, and on this stack only the
    # provoked alert fires. (An alert with `for:` cannot fire within this test; one
    # pending, e.g. latency on a slow machine, is reported, not failed.)
    def rule_state(state: str) -> tuple[list[str], set[str]]:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules_ = [r for g in groups for r in g["rules"]]
        errors = [f"{r['name']}: {r.get('lastError')}" for r in rules_ if r.get("health") != "ok"]
        return errors, {r["name"] for r in rules_ if r.get("state") == state}
    wait_for("Prometheus evaluated the rules since the download failed", 20,
             lambda: rule_state("firing")[1] >= EXPECTED_FIRING)
    errors, firing = rule_state("firing")
    pending = rule_state("pending")[1]
    for e in errors:
        fail(f"Prometheus rule evaluation: {e}")
    if firing == EXPECTED_FIRING and not errors:
        ok(f"Prometheus evaluates all {len(alerts)} rules without error; firing: {', '.join(sorted(firing))} "
           f"(the broken mirror), the others quiet{'; pending: ' + ', '.join(sorted(pending)) if pending else ''}")
    elif not errors:
        fail(f"firing alerts {sorted(firing)}, expected exactly {sorted(EXPECTED_FIRING)}")


def main() -> int:
    for tool in ("promtool", "prometheus"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: run MNISTFLOW_MONITORING=1 scripts/setup")
    rules()
    objects()
    with tempfile.TemporaryDirectory(prefix="mnistflow-monitoring-") as tmp:
        live(Path(tmp))
    if failures:
        print(f"{len(failures)} monitoring check(s) failed", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
