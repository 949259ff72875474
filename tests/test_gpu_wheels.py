"""The GPU check's offline install (bench/gpu_check.sh, issue 28): the wheels it carries cover what the GPU image lacks.

The GPU machine has no network, so what ``requirements.txt`` needs beyond its image (``bench/gpu_image.txt``) must
travel as the pinned wheels of ``bench/gpu_wheels.txt``. These tests fail when a dependency is added that neither
the image nor the wheels hold, or when a pinned wheel needs one of its own that is missing: the first GPU run
would stop at an import.
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
#: The image's interpreter, for the markers of the wheels' own requirements (``python_version < "3.15"``, ...).
IMAGE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                 "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                 "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _names(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.split("#")[0].strip()]


def _image() -> set[str]:
    return {_normalized(name) for name in _names(ROOT / "bench" / "gpu_image.txt")}


def _pins() -> dict[str, str]:
    pins = {}
    for line in _names(ROOT / "bench" / "gpu_wheels.txt"):
        name, version = line.split("==")
        pins[_normalized(name)] = version
    return pins


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(spec) for spec in project["dependencies"]]


def test_every_runtime_dependency_is_in_the_image_or_carried_as_a_wheel():
    covered = _image() | set(_pins())
    missing = [str(r) for r in _runtime_requirements() if _normalized(r.name) not in covered]
    assert not missing, f"add these to bench/gpu_wheels.txt (the GPU image lacks them): {missing}"


def test_each_carried_wheel_needs_only_the_image_and_the_other_wheels():
    covered = _image() | set(_pins())
    for name in _pins():
        needs = [Requirement(spec) for spec in metadata.requires(name) or []]
        needed = [r for r in needs if r.marker is None or r.marker.evaluate(IMAGE_MARKERS)]
        missing = [str(r) for r in needed if _normalized(r.name) not in covered]
        assert not missing, f"{name} needs {missing}, which neither the GPU image nor bench/gpu_wheels.txt holds"


def test_the_carried_wheels_are_the_versions_the_suite_runs_and_none_is_already_in_the_image():
    image = _image()
    for name, version in _pins().items():
        assert metadata.version(name) == version, (
            f"bench/gpu_wheels.txt pins {name}=={version}, the suite runs {metadata.version(name)}")
        assert name not in image, f"{name} is in the GPU image: carrying it would shadow the image's own"


def test_the_prepared_wheels_are_for_the_image_interpreter():
    script = (ROOT / "bench" / "prepare_gpu_wheels.sh").read_text(encoding="utf-8")
    assert "--python-version 3.12" in script and "-r \"$here/gpu_wheels.txt\"" in script
    assert "Python 3.12" in (ROOT / "bench" / "gpu_image.txt").read_text(encoding="utf-8")


def _write_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of one module ``name`` that defines ``VERSION`` (PEP 427 layout, built offline)."""
    import base64
    import hashlib
    import zipfile

    dist_info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": f"VERSION = {version!r}\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def _source_gpu_site(bench: Path, tmp_path: Path, then: str, pythonpath: str = ""):
    import subprocess
    import sys

    script = ROOT / "bench" / "gpu_site.sh"
    command = f'python="{sys.executable}"; here="{bench}"; source "{script}"; {then}'
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "PYTHONPATH": pythonpath})


def test_gpu_site_installs_a_missing_pin_offline_into_its_own_folder_and_refuses_without_wheels(tmp_path):
    bench = tmp_path / "bench"
    (bench / "gpu_wheels").mkdir(parents=True)
    (bench / "gpu_wheels.txt").write_text("# a pin this Python lacks\nqrlora_missing_pin==1.2.3\n", encoding="utf-8")

    refused = _source_gpu_site(bench, tmp_path, "echo unreachable")
    assert refused.returncode == 2 and "unreachable" not in refused.stdout
    assert len(refused.stderr.strip().splitlines()) == 1 and "qrlora_missing_pin==1.2.3" in refused.stderr
    assert "prepare_gpu_wheels.sh" in refused.stderr

    _write_wheel(bench / "gpu_wheels", "qrlora_missing_pin", "1.2.3")
    done = _source_gpu_site(bench, tmp_path, '"$python" -c "import qrlora_missing_pin as m; print(m.__file__, m.VERSION)"')
    assert done.returncode == 0, done.stderr
    module_file, version = done.stdout.strip().splitlines()[-1].split()
    assert version == "1.2.3" and Path(module_file).parent == tmp_path / "qrlora_gpu_site"

    # Once the pin is importable (the site folder on PYTHONPATH, as for a later command), nothing is installed.
    present = _source_gpu_site(bench, tmp_path, "echo ok", pythonpath=str(tmp_path / "qrlora_gpu_site"))
    assert present.returncode == 0 and present.stdout.strip() == "ok", present.stdout + present.stderr
