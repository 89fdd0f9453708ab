#!/usr/bin/env python3
"""Check that gossipfl installs on another platform from wheels only, without CUDA libraries.

    python scripts/check_wheels.py [--platform TAG ...] [--machine aarch64] [--python 3.11]

Resolves the runtime dependencies of pyproject.toml, and theirs, for the target (a 64-bit
Raspberry Pi by default) from the package index, with pip's own resolver and index, from wheel
metadata (no wheel is downloaded), and prints each package with the wheel pip would install.
Exit code 0: every dependency is a wheel and none is an NVIDIA/CUDA package; 1: not so; 3: the
index could not be reached.

Why not one `pip install --dry-run --platform ...`: pip evaluates environment markers against the
machine it runs on, not the target (pypa/pip#10050, closed as not planned), so on x86_64 it
follows torch's `platform_machine == "x86_64"` CUDA dependencies for an aarch64 wheel and fails.
This script runs pip with --no-deps and follows the dependencies itself, evaluating each marker
for the target, until nothing new appears; pip still picks every version.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")  # what a CUDA build of torch pulls in
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Name or service not known",
                  "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeout",
                  "ReadTimeout", "Connection refused")
UNREACHABLE = 3
# What pip on a 64-bit Raspberry Pi OS (glibc 2.36) installs: manylinux wheels up to glibc 2.36. This
# pip, given --platform, takes only the tags named, and the dependencies ship 2_17 and 2_28 wheels.
PI_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index."""


@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    wheel: str  # file name of the distribution pip picked


def target_environment(machine: str, python: str) -> dict[str, str]:
    """PEP 508 marker values of a Linux CPython `python` on `machine`."""
    full = f"{python}.0"
    return {"implementation_name": "cpython", "implementation_version": full, "os_name": "posix",
            "platform_machine": machine, "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "", "python_full_version": full,
            "python_version": python, "sys_platform": "linux"}


def runtime_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    return [Requirement(text) for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def applies(requirement: Requirement, environment: dict[str, str], extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""}))


def combined(requirements: list[Requirement]) -> str:
    """One requirement string for several of the same name: the union of extras, all specifiers."""
    extras = sorted(set().union(*(r.extras for r in requirements)))
    specifiers = ",".join(str(r.specifier) for r in requirements if r.specifier)
    return requirements[0].name + (f"[{','.join(extras)}]" if extras else "") + specifiers


def pip_resolve(requirements: dict[str, list[Requirement]], platforms: tuple[str, ...], python: str) -> list[dict]:
    """pip's pick for each requirement (all specifiers of a name together), without dependencies."""
    texts = [combined(reqs) for reqs in requirements.values()]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
             "--report", str(report), *(f"--platform={tag}" for tag in platforms), "--python-version", python,
             "--only-binary=:all:",
             "--target", str(Path(scratch) / "target"), *texts], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            unreachable = [line for line in result.stderr.splitlines() if any(e in line for e in NETWORK_ERRORS)]
            if unreachable:
                raise IndexUnreachable(unreachable[-1].strip())
            errors = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
            raise RuntimeError(f"pip found no wheels for {', '.join(platforms)}:\n" + "\n".join(errors))
        return json.loads(report.read_text())["install"]


def resolve(platforms: tuple[str, ...], machine: str, python: str) -> list[Resolved]:
    """Every runtime dependency of gossipfl, transitively, as pip would install it on the target."""
    environment = target_environment(machine, python)
    wanted: dict[str, list[Requirement]] = {}
    pending = [r for r in runtime_requirements() if applies(r, environment, set())]
    while pending:
        for requirement in pending:
            wanted.setdefault(canonicalize_name(requirement.name), []).append(requirement)
        items = pip_resolve(wanted, platforms, python)
        seen = {(name, str(r)) for name, reqs in wanted.items() for r in reqs}
        pending = []
        for item in items:
            extras = set(item.get("requested_extras") or ())
            for text in item["metadata"].get("requires_dist") or ():
                requirement = Requirement(text)
                key = (canonicalize_name(requirement.name), str(requirement))
                if key not in seen and applies(requirement, environment, extras):
                    seen.add(key)
                    pending.append(requirement)
    return sorted((Resolved(item["metadata"]["name"], item["metadata"]["version"],
                            item["download_info"]["url"].rsplit("/", 1)[-1]) for item in items),
                  key=lambda r: canonicalize_name(r.name))


def problems(resolved: list[Resolved]) -> list[str]:
    """Why this set does not make a wheels-only, CPU-only install (empty when it does)."""
    found = [f"{r.name} {r.version} is not a wheel ({r.wheel})" for r in resolved if not r.wheel.endswith(".whl")]
    found += [f"{r.name} {r.version} is a CUDA package" for r in resolved
              if canonicalize_name(r.name).startswith(CUDA_PREFIXES)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", action="append", metavar="TAG",
                        help="pip's --platform tag, repeatable (default: " + " ".join(PI_PLATFORMS) + ")")
    parser.add_argument("--machine", default="aarch64", help="platform_machine of the target")
    parser.add_argument("--python", default="3.11", help="the target's Python version")
    args = parser.parse_args()
    try:
        platforms = tuple(args.platform or PI_PLATFORMS)
        resolved = resolve(platforms, args.machine, args.python)
    except IndexUnreachable as exc:
        print(f"the package index is unreachable: {exc}", file=sys.stderr)
        return UNREACHABLE
    except RuntimeError as exc:  # pip found no wheel set: the install would fail there
        print(exc, file=sys.stderr)
        return 1
    for r in resolved:
        print(f"{r.name:<24} {r.version:<14} {r.wheel}")
    found = problems(resolved)
    for problem in found:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{len(resolved)} packages for {args.machine} ({', '.join(platforms)}), Python {args.python}: "
          + ("wheels only, no CUDA" if not found else f"{len(found)} problems"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
