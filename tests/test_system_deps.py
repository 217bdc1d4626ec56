"""The system-deps prerequisite of `make test`, `make serve` and `make monitor`
(harness/system_deps.sh): it reports exactly the missing packages, installs nothing when it
cannot (one line, non-zero status, no test run), and says nothing when all are there.

PATH is a folder of links to the few real tools the script uses plus, where a test says so,
small fakes standing in for java, apt-get, sudo and the packages' commands; nothing is
installed for real. The real commands are checked by the last test."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "harness" / "system_deps.sh"
SH = shutil.which("sh")
JAVA = "openjdk-17-jre-headless"
ALL = [JAVA, "prometheus", "chromium", "chromium-driver"]
JAVA_17 = 'openjdk version "17.0.15" 2025-04-15'
COMMANDS = {
    JAVA: ["java"],
    "prometheus": ["prometheus", "promtool"],
    "chromium": ["chromium"],
    "chromium-driver": ["chromedriver"],
}
# The real tools the script and make run, besides the shell's builtins.
TOOLS = ["sh", "id", "env", "mktemp", "rm", "make", "find"]


def write_executable(path: Path, body: str) -> None:
    # PATH's tools are links to the real ones: replace the link, never write through it.
    path.unlink(missing_ok=True)
    path.write_text(f"#!{SH}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def fake_java(folder: Path, version: str) -> None:
    write_executable(folder / "java", f"echo '{version}' >&2")


def fake_commands(folder: Path, *packages: str) -> None:
    """What `packages` put on PATH, as commands that do nothing (java prints version 17)."""
    for package in packages:
        for command in COMMANDS[package]:
            if command == "java":
                fake_java(folder, JAVA_17)
            else:
                write_executable(folder / command, "exit 0")


@pytest.fixture
def path(tmp_path) -> Path:
    """A PATH folder with only the real tools of TOOLS, none of the packages' commands."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in TOOLS:
        (folder / tool).symlink_to(shutil.which(tool))
    return folder


@pytest.fixture
def apt_get(path, tmp_path) -> Path:
    """A fake apt-get on PATH that records its arguments and installs a package by copying its
    fake commands onto PATH; returns the record file, which exists once apt-get was run."""
    archive = tmp_path / "archive"
    for package in ALL:
        (archive / package).mkdir(parents=True)
        fake_commands(archive / package, package)
    record = tmp_path / "apt-get.calls"
    cp = shutil.which("cp")
    write_executable(
        path / "apt-get",
        f"""echo "$*" >> {record}
[ "$1" = install ] || exit 0
for package in "$@"; do
    [ -d {archive}/$package ] && {cp} {archive}/$package/* {path}
done
exit 0""",
    )
    return record


def run(path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {"PATH": str(path), "TMPDIR": str(path.parent), **(env or {})}
    return subprocess.run(
        [SH, str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=60
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    """The whole output, which must be one line on stderr."""
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def named_packages(line: str) -> list[str]:
    """The packages a 'system-deps: missing A B; ...' line names."""
    assert line.startswith("system-deps: missing "), line
    return line.removeprefix("system-deps: missing ").split(";")[0].split()


@pytest.mark.parametrize(
    "present",
    [[], [JAVA], ["prometheus", "chromium"], [JAVA, "chromium", "chromium-driver"]],
    ids=["none", "java", "prometheus-chromium", "all-but-prometheus"],
)
def test_check_reports_exactly_the_missing_packages(path, apt_get, present):
    fake_commands(path, *present)
    result = run(path, "--check", *ALL)
    missing = [package for package in ALL if package not in present]
    assert result.returncode == 1
    line = one_line(result)
    assert named_packages(line) == missing
    assert line.endswith(f"run: apt-get install -y --no-install-recommends {' '.join(missing)}")
    assert not apt_get.exists()


def test_prometheus_counts_as_missing_without_promtool(path):
    write_executable(path / "prometheus", "exit 0")
    line = one_line(run(path, "--check", "prometheus"))
    assert named_packages(line) == ["prometheus"]


@pytest.mark.parametrize(
    ("version", "usable"),
    [
        ('openjdk version "17.0.15" 2025-04-15', True),
        ('openjdk version "21" 2023-09-19', True),
        ('openjdk version "11.0.22" 2024-01-16', False),
        ('java version "1.8.0_402"', False),
        ("no version here", False),
    ],
)
def test_java_needs_version_17_or_newer(path, version, usable):
    fake_java(path, version)
    result = run(path, "--check", JAVA)
    assert (result.returncode, result.stderr == "") == ((0, True) if usable else (1, False))


def test_java_is_looked_up_in_java_home_first(path, tmp_path):
    # TorchServe runs $JAVA_HOME/bin/java when JAVA_HOME is set, whatever PATH says.
    fake_java(path, 'openjdk version "17.0.15"')
    java_home = tmp_path / "jdk11"
    (java_home / "bin").mkdir(parents=True)
    fake_java(java_home / "bin", 'openjdk version "11.0.22"')
    assert run(path, "--check", JAVA, env={"JAVA_HOME": str(java_home)}).returncode == 1
    assert run(path, "--check", JAVA, env={"JAVA_HOME": str(path.parent / "none")}).returncode == 1
    assert run(path, "--check", JAVA).returncode == 0


def test_installs_only_the_missing_packages_then_says_nothing(path, apt_get):
    fake_commands(path, "chromium")
    first = run(path, *ALL)
    assert first.returncode == 0, first.stderr
    assert one_line(first).endswith("... done")
    install = [call for call in apt_get.read_text().splitlines() if call.startswith("install")]
    assert install == [f"install -y -qq --no-install-recommends {JAVA} prometheus chromium-driver"]
    calls = apt_get.read_text()
    second = run(path, *ALL)
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert apt_get.read_text() == calls
    assert not list(path.parent.glob("camserve-system-deps.*")), "the log of a success is kept"


def test_uses_sudo_when_not_root(path, apt_get):
    write_executable(path / "id", "echo 1000")
    write_executable(path / "sudo", f'echo "$*" >> {path.parent}/sudo.calls; exec "$@"')
    result = run(path, "prometheus")
    assert result.returncode == 0, result.stderr
    sudo_calls = (path.parent / "sudo.calls").read_text().splitlines()
    assert [call.split()[2:4] for call in sudo_calls] == [["apt-get", "update"]] + [
        ["apt-get", "install"]
    ]


def cannot_install_without_apt_get(path: Path) -> None:
    (path / "apt-get").unlink()


def cannot_install_without_root_or_sudo(path: Path) -> None:
    write_executable(path / "id", "echo 1000")


def cannot_install_when_apt_get_fails(path: Path) -> None:
    (path / "apt-get").rename(path / "apt-get.real")
    write_executable(path / "apt-get", f'{path}/apt-get.real "$@"; echo "E: offline" >&2; exit 100')


@pytest.mark.parametrize(
    ("cause", "says"),
    [
        (cannot_install_without_apt_get, "no apt-get here"),
        (cannot_install_without_root_or_sudo, "run as root: apt-get install -y"),
        (cannot_install_when_apt_get_fails, "failed; run: apt-get update && apt-get install -y"),
    ],
)
def test_stops_with_one_line_when_it_cannot_install(path, apt_get, cause, says):
    fake_commands(path, JAVA, "chromium-driver")
    cause(path)
    result = run(path, *ALL)
    assert result.returncode == 1
    line = one_line(result)
    assert named_packages(line) == ["prometheus", "chromium"]
    assert says in line
    if cause is cannot_install_when_apt_get_fails:
        log = Path(line.split("(log: ")[1].split(")")[0])
        assert "E: offline" in log.read_text()
    else:
        assert not apt_get.exists()
    assert not (path / "prometheus").exists()


def test_bad_package_name_exits_2(path):
    result = run(path, "--check", "prometheus", "promethues")
    assert result.returncode == 2
    assert "unknown package 'promethues'" in one_line(result)


@pytest.mark.parametrize(
    ("target", "packages"),
    [("test", ALL), ("serve", [JAVA]), ("monitor", ["prometheus"])],
)
def test_make_target_stops_before_anything_else(path, tmp_path, target, packages):
    """The real Makefile, in a folder of its own: without a way to install, `make <target>`
    ends at system-deps, naming the packages that target needs, and runs nothing else."""
    checkout = tmp_path / "checkout"
    (checkout / "harness").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", checkout)
    shutil.copy(SCRIPT, checkout / "harness")
    write_executable(path / "id", "echo 1000")  # not root, and no sudo on PATH
    result = subprocess.run(
        ["make", "-C", str(checkout), "--no-print-directory", target],
        capture_output=True,
        text=True,
        env={"PATH": str(path)},
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stdout == ""  # no recipe after system-deps was started (make echoes them)
    script_line, make_line = result.stderr.splitlines()
    assert named_packages(script_line) == packages
    assert make_line.endswith("system-deps] Error 1")
    assert sorted(p.name for p in checkout.iterdir()) == ["Makefile", "harness"]


def test_with_everything_installed_it_says_nothing():
    """On this machine's own PATH: what `make test` needs is there (its prerequisite put it
    there), so both modes print nothing and exit 0."""
    for args in (["--check", *ALL], ALL):
        result = subprocess.run(
            [SH, str(SCRIPT), *args], capture_output=True, text=True, env=os.environ, timeout=60
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
