"""`link/ws.py` reaches into websockets' internals (`send_context`, `protocol`, `transport`):
these tests fail loudly the day the installed websockets, or the version range pyproject.toml
allows, moves past the major versions it was tested against."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version
from websockets.version import version as websockets_version

from provider_agent.link.ws import TESTED_MAJOR_VERSIONS

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def websockets_requirement() -> Requirement:
    """The `websockets` line of the project's dependencies (exactly one)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found = [
        requirement
        for line in project["dependencies"]
        if (requirement := Requirement(line)).name == "websockets"
    ]
    assert len(found) == 1, f"expected one websockets dependency, found {found}"
    return found[0]


def test_the_installed_websockets_is_a_tested_major_version() -> None:
    """A websockets outside the tested majors may have moved the internals ws.py uses: test
    ws.py against it, then add its major to TESTED_MAJOR_VERSIONS."""
    installed = Version(websockets_version)
    assert installed.major in TESTED_MAJOR_VERSIONS, (
        f"websockets {installed} is installed, but link/ws.py was tested against majors "
        f"{sorted(TESTED_MAJOR_VERSIONS)} only: check its uses of websockets' internals"
    )


def test_the_dependency_range_allows_exactly_the_tested_majors() -> None:
    """pyproject.toml must not let pip install an untested major (an upper bound below the next
    major), and its upper bound must not cut into a tested one (its last releases allowed)."""
    specifier = websockets_requirement().specifier
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in specifier), (
        f"websockets{specifier} has no upper bound: a new major would be installed untested"
    )
    for major in range(max(TESTED_MAJOR_VERSIONS) + 10):
        allowed = [v for v in (f"{major}.0", f"{major}.99.99") if specifier.contains(v)]
        if major in TESTED_MAJOR_VERSIONS:
            assert specifier.contains(f"{major}.99.99"), (
                f"websockets{specifier} cuts off tested major {major}"
            )
        else:
            assert not allowed, f"websockets{specifier} allows untested websockets {allowed}"
    assert specifier.contains(websockets_version)
