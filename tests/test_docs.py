"""Every code block of docs/plugins.md runs, in order, as datasette tests its documentation.

A python or toml block whose first line is `# <path>` is a file of the guide's example package;
the `text` block is the package's layout, which must list exactly those files; a `console` block
is run command by command (`$ ...`) in the package directory, and what it shows must be printed
(`...` stands for any text, or any lines). `pip install` installs into a directory of the test's
own, on PYTHONPATH, not into the environment running the tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def matches(expected: list[str], actual: list[str]) -> bool:
    """Lines equal up to whitespace; `...` is any text within a line, or alone any lines."""
    if not expected:
        return not actual
    if expected[0].strip() == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    if not actual:
        return False
    pattern = ".*".join(re.escape(" ".join(part.split())) for part in expected[0].split("..."))
    return bool(re.fullmatch(pattern, " ".join(actual[0].split()))) and matches(
        expected[1:], actual[1:]
    )


def sessions(body: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines of a console block, each with the output shown under it."""
    found: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            found.append((line[2:], []))
        else:
            found[-1][1].append(line)
    return found


def run(command: str, package: Path, site: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    if command.startswith("pip install "):
        command = (
            f"{sys.executable} -m pip install --quiet --no-deps --no-build-isolation "
            f"--target {site} {command.removeprefix('pip install ')}"
        )
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(site)
    env.pop("SHIPHOOK_PLUGINS", None)
    return subprocess.run(
        ["bash", "-c", command],
        cwd=package,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_code_block_of_the_plugin_guide_runs(tmp_path):
    package, site = tmp_path / "shiphook-files", tmp_path / "site"
    package.mkdir()
    written: list[str] = []
    layout: list[str] = []
    ran = 0
    for language, body in BLOCK.findall(GUIDE.read_text()):
        first = body.splitlines()[0]
        if language in ("python", "toml"):
            assert first.startswith("# "), f"a {language} block that is not a file: {first}"
            path = package / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            written.append(first[2:].strip())
        elif language == "text":
            layout = [line.split("#")[0].strip() for line in body.splitlines()[1:]]
        elif language == "console":
            for command, shown in sessions(body):
                result = run(command, package, site)
                assert result.returncode == 0, (command, result.stdout, result.stderr)
                printed = result.stdout.splitlines()
                assert matches(shown, printed), (command, shown, printed)
                ran += 1
        else:
            raise AssertionError(f"a ```{language} block, which nothing runs: {first}")
    assert sorted(layout) == sorted(p for p in written if p != "shiphook.toml")
    assert ran >= 5


def test_the_readme_links_the_guide():
    assert "(docs/plugins.md)" in (ROOT / "README.md").read_text()


def test_matches_reads_the_ellipsis_as_the_guide_uses_it():
    assert matches(["a", "...", "c ... e"], ["a", "b", "b", "c  d e"])
    assert not matches(["a", "c"], ["a", "b", "c"])
