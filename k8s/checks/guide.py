#!/usr/bin/env python3
"""Lints the commands of the deploy guides without a cluster (run by k8s/check).

Takes every ```sh block of the sections "Deploying..." and "Local cluster..." of
k8s/README.md and README.md, splits it into simple commands (continuation lines
joined, `$(...)` checked as commands of their own, `&&`, `|`, `;`, `&` and
for-loops taken apart) and checks each as far as this machine can:

  kubectl     rules kubectl only applies once it has an API server (`get` with
              -w/--watch and more than one resource type), then the command itself,
              run by the real kubectl against an address where nothing listens: a
              usage error (unknown flag, bad combination, a -k directory that does not
              render) fails; `--dry-run=client` commands run to the end; whatever
              needs the server (apply's REST mapping included, so `apply
              --dry-run=client` cannot run here) is reported as unverified; a
              `create` is also run with --dry-run=client, which needs none
  repo paths  scripts (k8s/..., scripts/...) exist and are executable; any argument
              naming a repository path exists
  the rest    gcloud, helm, podman, nats, ...: named as unverified, never run

Usage: guide.py [FILE.md ...]      (default: the two READMEs)
       guide.py --self-test        the fixture's bad commands must fail, its good ones pass
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".tools" / "venv" / "bin" / "kubectl"
FIXTURE = Path(__file__).resolve().parent / "guide-fixture.md"
SECTIONS = re.compile(r"^## (Deploying|Local cluster)", re.M)
# Local helpers the guide uses only to compute values; harmless, but not run here.
LOCAL = {"openssl", "base64", "sed", "grep", "cat", "echo", "mkdir", "cd", "export", "true"}
# kubectl flags that take a value as the next word (for finding positional arguments).
VALUE_FLAGS = {"-n", "--namespace", "-l", "--selector", "-o", "--output", "-f", "--filename", "-k",
               "--kustomize", "-c", "--container", "-L", "--label-columns", "--context", "--field-selector",
               "--sort-by", "--for", "--timeout", "--request-timeout", "-p", "--type"}
OFFLINE_KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: offline, user: {token: offline}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
current-context: offline
"""
# Key files the guide makes with openssl (the model-signing key pair): made for real in a
# scratch directory, so that the kubectl commands reading them (--from-file) are checked.
KEY_COMMANDS = {"genpkey", "pkey"}
SCRATCH: Path | None = None
NO_SERVER = re.compile(r"connection to the server|connection refused|unable to recognize|"
                       r"couldn't get current server|Unable to connect to the server", re.I)


def sections(path: Path) -> list[tuple[str, str]]:
    """(heading, text) of the deploy sections of a Markdown file."""
    text = path.read_text()
    found = []
    for m in SECTIONS.finditer(text):
        end = re.compile(r"^## ", re.M).search(text, m.end())
        found.append((text[m.start():text.index("\n", m.start())].lstrip("# "), text[m.start():end.start() if end else None]))
    return found


def code_lines(section: str) -> list[str]:
    """Logical lines of the sh/bash blocks (continuations joined)."""
    lines = []
    for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", section, re.M | re.S):
        lines += [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]
    return lines


def substitutions(line: str) -> tuple[str, list[str]]:
    """Replaces each $(...) by a placeholder; returns the line and the inner commands."""
    inner, out, i = [], [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            body, _ = substitutions(line[i + 2:j - 1])
            inner += [body] + substitutions(line[i + 2:j - 1])[1]
            out.append("SUBST")
            i = j
        else:
            out.append(line[i])
            i += 1
    return "".join(out), inner


def commands(line: str, env: dict[str, str]) -> list[list[str]]:
    """The simple commands of one logical line, variables expanded from env (else 'x')."""
    line, inner = substitutions(line)
    found = []
    for text in [line] + inner:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as e:
            found.append(["<unparsable>", str(e), text])
            continue
        current: list[str] = []
        redirect = False
        for tok in tokens + [";"]:
            if redirect:
                redirect = False  # the file a redirection names
            elif tok in (">", ">>", "<", "2>"):
                redirect = True
            elif tok and set(tok) <= set(";&|"):
                if current:
                    found.append(current)
                current = []
            else:
                current.append(tok)
    result = []
    for words in found:
        if words[0] in ("for", "done", "while", "if", "fi", "then"):
            continue  # a loop header: its list is data, its body comes as commands
        if words[0] == "do":
            words = words[1:]
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            name, value = words[0].split("=", 1)
            env[name] = expand(value, env)
            words = words[1:]
        if words:
            result.append([expand(w, env) for w in words])
    return result


def expand(word: str, env: dict[str, str]) -> str:
    word = word.replace("SUBST", "x")
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), "x"), word)


def positional(args: list[str]) -> list[str]:
    words, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in VALUE_FLAGS
        else:
            words.append(a)
    return words


def check_kubectl(args: list[str], kubeconfig: Path) -> tuple[str, str]:
    """('ok'|'fail'|'unverified', why) for the arguments after `kubectl`."""
    words = positional(args)
    verb = words[0] if words else ""
    watch = any(a in ("-w", "--watch", "--watch-only") or re.match(r"--watch(-only)?=true", a) for a in args)
    if verb == "get" and watch:
        types = {t.split("/")[0] for w in words[1:] for t in w.split(",")}
        if len(types) > 1 or any("/" in w for w in words[1:]) and len(words) > 2:
            return "fail", f"--watch with several resource types ({', '.join(sorted(types))}): kubectl refuses it"
    for flag in ("-k", "--kustomize"):
        if flag in args and not (ROOT / args[args.index(flag) + 1]).is_dir():
            return "fail", f"{args[args.index(flag) + 1]} is not a directory of this repository"
    if not KUBECTL.exists() and not shutil.which("kubectl"):
        return "unverified", "no kubectl here"
    if SCRATCH is not None:
        made = []
        for a in args:
            m = re.fullmatch(r"--from-file=((?:[^=]+=)?)([^=]+)", a)
            if m and not (ROOT / m.group(2)).exists() and (SCRATCH / m.group(2)).exists():
                a = f"--from-file={m.group(1)}{SCRATCH / m.group(2)}"
            made.append(a)
        args = made
    try:
        proc = subprocess.run([str(KUBECTL if KUBECTL.exists() else "kubectl"), *args, "--request-timeout=2s"],
                              cwd=ROOT, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
                              env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    except subprocess.TimeoutExpired:
        return "unverified", "kubectl did not finish within 20 s without a server"
    output = (proc.stdout + proc.stderr).strip()
    errors = [line for line in output.splitlines()
              if re.match(r"(error|Error):", line) and not NO_SERVER.search(line)]
    if errors:
        return "fail", errors[0]
    if proc.returncode == 0:
        return "ok", "ran offline" + (" (--dry-run=client)" if "--dry-run=client" in args else "")
    if NO_SERVER.search(output) and verb == "create" and not any(a.startswith("--dry-run") for a in args):
        status, why = check_kubectl(args + ["--dry-run=client", "-o", "name"], kubeconfig)
        if status != "unverified":
            return status, f"{why}; without it the command needs an API server"
    if NO_SERVER.search(output):
        what = "rendered; " if "-k" in args else ""
        return "unverified", f"{what}flags accepted by kubectl, the rest needs an API server"
    return "fail", output.splitlines()[-1] if output else f"exit {proc.returncode}"


def check(words: list[str], kubeconfig: Path) -> tuple[str, str]:
    prog = words[0]
    for a in words[1:]:
        for path in re.findall(r"(?:^|=)((?:k8s|scripts)/[\w./-]+)", a):
            if not (ROOT / path).exists():
                return "fail", f"{path} does not exist in this repository"
    if prog == "<unparsable>":
        return "fail", f"cannot parse: {words[1]}"
    if os.path.basename(prog) == "kubectl":
        return check_kubectl(words[1:], kubeconfig)
    if re.match(r"(\./)?(k8s|scripts)/", prog):
        path = ROOT / prog.removeprefix("./")
        if not path.is_file():
            return "fail", f"{prog} does not exist"
        if not os.access(path, os.X_OK):
            return "fail", f"{prog} is not executable"
        return "unverified", "exists and is executable; not run here (it builds, pushes or sets up)"
    if prog == "openssl" and len(words) > 1 and words[1] in KEY_COMMANDS and SCRATCH is not None:
        proc = subprocess.run(words, cwd=SCRATCH, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            return "fail", (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return "ok", "ran in a scratch directory"
    if prog in LOCAL:
        return "ok", "a local helper, not run"
    return "unverified", f"no {prog} here" if not shutil.which(prog) else f"{prog} is not run here (it acts on real resources)"


def lint(paths: list[Path]) -> list[tuple[str, str, str, str]]:
    """(where, command, status, why) for every command of the guides."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(OFFLINE_KUBECONFIG)
        global SCRATCH
        SCRATCH = Path(tmp) / "files"
        SCRATCH.mkdir()
        for path in paths:
            for heading, text in sections(path):
                env: dict[str, str] = {}
                for line in code_lines(text):
                    for words in commands(line, env):
                        status, why = check(words, kubeconfig)
                        results.append((f"{path.relative_to(ROOT)} \"{heading}\"", shlex.join(words), status, why))
    return results


def report(results) -> int:
    failed = 0
    where = None
    for w, command, status, why in results:
        if w != where:
            print(f"  {w}")
            where = w
        short = command if len(command) <= 90 else command[:87] + "..."
        mark = {"ok": "ok  ", "fail": "FAIL", "unverified": "--  "}[status]
        print(f"    {mark} {short}: {why}")
        failed += status == "fail"
    counts = {s: sum(1 for r in results if r[2] == s) for s in ("ok", "unverified", "fail")}
    print(f"  {len(results)} commands: {counts['ok']} ok, {counts['unverified']} unverified (named above), {counts['fail']} failed")
    return 1 if failed or not results else 0


def self_test() -> int:
    """Commands marked `# lint: reject` in the fixture must fail, the others must not."""
    expected = {}
    for heading, text in sections(FIXTURE):
        env: dict[str, str] = {}
        for line in code_lines(text):
            for words in commands(line, env):
                expected[shlex.join(words)] = "# lint: reject" in line
    wrong = 0
    for _, command, status, why in lint([FIXTURE]):
        if (status == "fail") != expected[command]:
            print(f"  FAIL self-test: {command}: {status} ({why}), expected {'a failure' if expected[command] else 'no failure'}")
            wrong += 1
    rejected = sum(expected.values())
    if not wrong:
        print(f"  ok   self-test: the fixture's {rejected} bad commands rejected, its {len(expected) - rejected} good ones not")
    return 1 if wrong or not rejected else 0


def main() -> int:
    if "--self-test" in sys.argv:
        return self_test()
    paths = [Path(a).resolve() for a in sys.argv[1:]] or [ROOT / "k8s" / "README.md", ROOT / "README.md"]
    return report(lint(paths))


if __name__ == "__main__":
    sys.exit(main())
