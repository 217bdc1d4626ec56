"""camserve as an installed package: a wheel in a fresh venv, used outside the checkout.

The wheel is installed without ``-e`` into a new virtual environment. Its dependencies (torch,
TorchServe...) come from the project's venv through a ``.pth`` line, so the test does not
download or copy 5 GB; the ``camserve`` package itself exists only as the installed wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import requests
import torch
import torchvision

from harness.local_torchserve import LocalTorchServe
from tests.conftest import CONFIG, REPO, held_out, png_bytes

pytestmark = pytest.mark.integration


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the tracked files, as a user's clone or sdist would hold them.
    source = tmp_path_factory.mktemp("source")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        target = source / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name.decode()).read_bytes())
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        cwd=out,
    )  # fmt: skip
    [built] = out.glob("camserve-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # Dependencies only: the project's site-packages, added after the fresh one.
    (Path(purelib) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        cwd=venv.parent,
    )  # fmt: skip
    return venv


def test_the_wheel_holds_core_tools_handler_and_config_but_not_the_harness(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "camserve/explainer.py" in names
    assert "camserve/tools/archive.py" in names
    assert "camserve/handlers/camserve_handler.py" in names
    assert "camserve/config/metrics.yaml" in names
    assert "camserve/config/kserve/config.properties" in names
    assert "camserve/schema/response.schema.json" in names
    assert "camserve/sources/timm.py" in names and "camserve/sources/transformers.py" in names
    assert not [n for n in names if n.startswith(("harness/", "tests/", "bench/"))]
    # camserve alone installs neither timm nor transformers: they are extras.
    [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    for package, extra in (("timm", "timm"), ("transformers", "transformers")):
        [pin] = [r for r in requires if r.startswith(f"{package}==")]
        assert f'extra == "{extra}"' in pin, pin
    assert any(r.startswith("safetensors==") and "extra" not in r for r in requires)


def test_archive_and_calibrate_from_another_directory_then_serve(fresh_venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = fresh_venv / "bin" / "python"
    where = run([python, "-c", "import camserve; print(camserve.__file__)"], cwd=work)
    assert str(fresh_venv) in where.stdout, "camserve must come from the installed wheel"

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.save(model.state_dict(), work / "weights.pth")
    (work / "labels.txt").write_text("alpha\nbeta\ngamma\n")
    images = work / "images"
    images.mkdir()
    for i in range(4):
        held_out(i).image.save(images / f"{i}.png")
    camserve = fresh_venv / "bin" / "camserve"
    built = run(
        [camserve, "archive", "--arch", "resnet18", "--weights", "weights.pth",
         "--labels", "labels.txt", "--input-size", "64", "--export-path", "store"],
        cwd=work,
    )  # fmt: skip
    assert "target layer 'layer4'" in built.stdout
    run([camserve, "calibrate", "store/resnet18.mar", "images"], cwd=work)
    archive = work / "store" / "resnet18_calibrated.mar"
    with zipfile.ZipFile(archive) as mar:
        names = mar.namelist()
    assert "camserve/explainer.py" in names and "calibration.pt" in names
    assert not [n for n in names if n.startswith("camserve/tools/")], "the .mar ships the core"

    server = LocalTorchServe.on_free_ports(
        tmp_path / "ts", CONFIG, work / "store", models="resnet18=resnet18_calibrated.mar"
    )
    server.start(wait_for="resnet18")
    try:
        response = requests.post(
            f"{server.inference_url}/predictions/resnet18",
            data=png_bytes(held_out(0).image),
            headers={**server.auth(), "Content-Type": "image/png"},
            timeout=60,
        )
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["zero_reference"]["reference"] == "calibration_mean"
    assert {p["label"] for p in body["predictions"]} <= {"alpha", "beta", "gamma"}
    assert json.dumps(body)  # plain JSON all the way down
