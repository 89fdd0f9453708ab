"""The Raspberry Pi install: every runtime dependency resolves to a wheel for 64-bit ARM, CPU only.

Asks the package index (pip's resolver, wheel metadata only, nothing downloaded); about 17 s on the project machine.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_wheels.py"


def load_check_wheels():
    """scripts/ is no package: load the script as a module."""
    spec = importlib.util.spec_from_file_location("check_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_every_runtime_dependency_has_a_cpu_wheel_for_a_64_bit_pi():
    check = load_check_wheels()
    try:
        resolved = check.resolve(check.PI_PLATFORMS, "aarch64", "3.11")
    except check.IndexUnreachable as exc:
        pytest.skip(f"the package index is unreachable from this machine: {exc}")
    names = {canonicalize_name(r.name): r for r in resolved}
    pi = check.target_environment("aarch64", "3.11")
    direct = {canonicalize_name(r.name) for r in check.runtime_requirements() if check.applies(r, pi, set())}
    assert direct <= names.keys(), f"not resolved: {direct - names.keys()}"
    assert all(r.wheel.endswith(".whl") and ("aarch64" in r.wheel or "-none-any" in r.wheel)
               for r in resolved), [r.wheel for r in resolved]
    assert not [n for n in names if n.startswith(("nvidia", "cuda", "triton"))], sorted(names)
    assert Version(names["torch"].version) < Version("2.11")  # 2.11+ aarch64 wheels are CUDA builds
    assert check.problems(resolved) == []


def test_the_check_flags_a_cuda_package_and_an_sdist():
    check = load_check_wheels()
    found = check.problems([check.Resolved("nvidia-cudnn-cu13", "9.20", "nvidia_cudnn_cu13-9.20-py3-none-any.whl"),
                            check.Resolved("somepkg", "1.0", "somepkg-1.0.tar.gz"),
                            check.Resolved("numpy", "2.4", "numpy-2.4-cp311-cp311-manylinux_2_28_aarch64.whl")])
    assert found == ["somepkg 1.0 is not a wheel (somepkg-1.0.tar.gz)", "nvidia-cudnn-cu13 9.20 is a CUDA package"]


def test_markers_are_evaluated_for_the_target_not_this_machine():
    check = load_check_wheels()
    from packaging.requirements import Requirement
    pi = check.target_environment("aarch64", "3.11")
    x86 = check.target_environment("x86_64", "3.11")
    cuda = Requirement('nvidia-cudnn-cu12==9.10; platform_system == "Linux" and platform_machine == "x86_64"')
    assert not check.applies(cuda, pi, set()) and check.applies(cuda, x86, set())
    pinned = [r for r in check.runtime_requirements() if r.name == "torch" and check.applies(r, pi, set())]
    assert [str(r.specifier) for r in pinned] == ["<2.11,>=2.2"]
