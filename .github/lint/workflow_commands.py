#!/usr/bin/env python3
"""What the workflows run exists in the repository (scripts/check-workflows).

For each workflow file given:
  - every word of a `run:` script that names a repository path (scripts/..., k8s/...,
    .github/..., .ci/...) exists, and one in command position (first word, or after
    |, &&, ||, ;, a parenthesis) is an executable file;
  - every `uses: ./...` (a local action) exists;
  - every file of a hashFiles(...) in a cache key exists (a missing one hashes to
    '' silently, and the cache would never change with it);
  - every option of a workflow_dispatch input named `overlay` is an overlay
    (k8s/overlays/<name>/kustomization.yaml).

Usage: workflow_commands.py FILE...    exits 1 and names each problem
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
REPO_PATH = re.compile(r"^(\./)?(scripts|k8s|\.github|\.ci)/[\w./-]*$")
SEPARATORS = {"|", "||", "&&", ";", "(", ")", "&", "$(", "`"}


def run_words(script: str) -> list[tuple[str, bool]]:
    """(word, in command position) for each word of a shell script."""
    words = []
    for line in re.sub(r"\\\n", " ", script).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        lexer.wordchars += "$:{}=@%+,~"
        try:
            tokens = list(lexer)
        except ValueError:
            tokens = line.split()
        command_next = True
        for token in tokens:
            if token in SEPARATORS or set(token) <= set("|&;()"):
                command_next = True
                continue
            # A variable assignment before the command keeps the command position.
            words.append((token, command_next and "=" not in token))
            if "=" not in token:
                command_next = False
    return words


def check(path: Path) -> list[str]:
    problems = []
    workflow = YAML(typ="safe").load(path.read_text())
    text = path.read_text()
    for job_name, job in (workflow.get("jobs") or {}).items():
        for i, step in enumerate(job.get("steps") or []):
            where = f"{path.name}: job {job_name}, step {step.get('name') or step.get('uses') or i + 1}"
            uses = step.get("uses", "")
            if uses.startswith("./") and not (ROOT / uses).exists():
                problems.append(f"{where}: local action {uses} does not exist")
            for word, is_command in run_words(step.get("run", "")):
                if not REPO_PATH.match(word):
                    continue
                target = ROOT / word
                if not target.exists():
                    problems.append(f"{where}: {word} does not exist")
                elif is_command and not (target.is_file() and target.stat().st_mode & 0o111):
                    problems.append(f"{where}: {word} is run but is not an executable file")
    for args in re.findall(r"hashFiles\(([^)]*)\)", text):
        for pattern in re.findall(r"'([^']+)'", args):
            if not any(ROOT.glob(pattern)):
                problems.append(f"{path.name}: hashFiles('{pattern}') matches no file")
    triggers = workflow.get("on") or workflow.get(True) or {}
    dispatch = (triggers.get("workflow_dispatch") or {}) if isinstance(triggers, dict) else {}
    overlay = (dispatch.get("inputs") or {}).get("overlay") or {}
    for name in list(overlay.get("options") or []) + [overlay.get("default")] * ("default" in overlay):
        if not (ROOT / "k8s" / "overlays" / str(name) / "kustomization.yaml").exists():
            problems.append(f"{path.name}: overlay input offers {name}, which is not in k8s/overlays")
    return problems


def main() -> int:
    files = [Path(a) for a in sys.argv[1:]]
    if not files:
        print(__doc__, file=sys.stderr)
        return 2
    problems = [p for f in files for p in check(f)]
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
