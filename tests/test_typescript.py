"""relay/static/client.d.ts stays true to client.js: tsc (pinned in tests/typescript/, installed
with `npm ci`) type-checks a usage file, the README's React hook, and a comparison with the
declarations tsc infers from client.js itself; the statuses are compared with the ones client.js
reports; and a deliberately wrong d.ts must fail the same check."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TS_DIR = ROOT / "tests" / "typescript"
STATIC = ROOT / "relay" / "static"
TS_FILES = [
    "package.json",
    "tsconfig.json",
    "tsconfig.infer.json",
    "usage.ts",
    "react-hook.ts",
    "react.d.ts",
    "api-matches-js.ts",
]


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/typescript/node_modules from package-lock.json (npm ci, once per lock change)."""
    npm = shutil.which("npm")
    assert npm is not None, "npm not found: install Node.js 20 (the TypeScript check needs it)"
    lock = json.loads((TS_DIR / "package-lock.json").read_text())
    wanted = lock["packages"]["node_modules/typescript"]["version"]
    installed = TS_DIR / "node_modules" / "typescript" / "package.json"
    if not installed.is_file() or json.loads(installed.read_text())["version"] != wanted:
        out = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=TS_DIR,
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert out.returncode == 0, out.stderr
    return TS_DIR / "node_modules"


def tsc(project_dir: Path, node_modules: Path) -> subprocess.CompletedProcess[str]:
    """Infer client.js's declarations, then type-check the project; the second run's result."""
    node = shutil.which("node")
    assert node is not None
    compiler = str(node_modules / "typescript" / "bin" / "tsc")
    for config in ("tsconfig.infer.json", "tsconfig.json"):
        out = subprocess.run(
            [node, compiler, "-p", config, "--pretty", "false"],
            cwd=project_dir,
            capture_output=True,
            text=True,
            timeout=50,
        )
        if out.returncode != 0:
            return out
    return out


def test_declarations_match_the_client(node_modules: Path) -> None:
    out = tsc(TS_DIR, node_modules)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_wrong_declaration_fails_the_check(node_modules: Path, tmp_path: Path) -> None:
    """The same check on a copy whose d.ts declares an option client.js does not have."""
    (tmp_path / "relay" / "static").mkdir(parents=True)
    shutil.copy(STATIC / "client.js", tmp_path / "relay" / "static" / "client.js")
    dts = (STATIC / "client.d.ts").read_text()
    wrong = dts.replace(
        "  maxBackoffMs?: number;\n", "  maxBackoffMs?: number;\n  retry?: boolean;\n"
    )
    assert wrong != dts
    (tmp_path / "relay" / "static" / "client.d.ts").write_text(wrong)
    copy = tmp_path / "tests" / "typescript"
    copy.mkdir(parents=True)
    for name in TS_FILES:
        shutil.copy(TS_DIR / name, copy / name)
    (copy / "node_modules").symlink_to(node_modules)
    out = tsc(copy, node_modules)
    assert out.returncode != 0
    assert (
        "api-matches-js.ts" in out.stdout
        and "sameOptions"
        in (copy / "api-matches-js.ts").read_text().splitlines()[_error_line(out.stdout) - 1]
    ), out.stdout


def _error_line(output: str) -> int:
    match = re.search(r"api-matches-js\.ts\((\d+),\d+\)", output)
    assert match, output
    return int(match.group(1))


def test_statuses_are_the_ones_client_js_reports() -> None:
    reported = set(re.findall(r'onStatus\("([a-z_]+)"', (STATIC / "client.js").read_text()))
    dts = (STATIC / "client.d.ts").read_text()
    block = dts[dts.index("export interface StatusDetails") :]
    block = block[: block.index("\n}")]
    declared = set(re.findall(r"^  ([a-z_]+): ", block, re.MULTILINE))
    assert reported and declared == reported


def test_readme_shows_the_checked_react_hook() -> None:
    hook = (TS_DIR / "react-hook.ts").read_text()
    body = hook[hook.index("export function useBatchProgress") :].strip()
    assert body in (ROOT / "README.md").read_text()
