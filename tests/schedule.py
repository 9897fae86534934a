"""Test order for two xdist workers: the longest work first, fixtures computed once.

The suite is bound by its few long tests (a TPU plan compile, the kill -9 trials, the
notebooks): if one of them starts last, one worker idles while the other finishes it.
`order_items` sorts the collection longest-first by the durations of the last
`--store-durations` run (``tests/durations.json``, committed), and :class:`UnitScheduling`
(``--dist loadgroup``, see the Makefile) hands each worker the next unit in that order as
it frees up: greedy longest-processing-time scheduling.

A unit is one test, or every test sharing an instance of a fixture defined in its own
module with module scope (a trained run, a batch of CLI processes): xdist sends a unit
to one worker, so the fixture is built once, not once per worker. The workers write the
units to a file the controller reads (``JAXLLM_TEST_UNITS``): xdist's own ``loadgroup``
renames node ids, which pytest 9 no longer allows.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
# A test the durations file does not know yet (a new one) is placed as if it took this.
UNKNOWN_SECONDS = 2.0


def load_durations(path: str = DURATIONS) -> dict[str, float]:
    """Seconds per test node id (setup + call + teardown) from the last stored run."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _shared_fixture_keys(item: pytest.Item) -> list[str]:
    """Keys of the module-scoped fixture instances (defined in the test's own module) it uses."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    keys = []
    params = getattr(getattr(item, "callspec", None), "params", {})
    for name in info.names_closure:
        for fixdef in info.name2fixturedefs.get(name, ()):
            # baseid ends in ".py" for a fixture defined in a test module (conftest's
            # and pytest's own, such as tmp_path_factory, are shared and cheap).
            if fixdef.scope in ("module", "package", "session") and fixdef.baseid.endswith(".py"):
                keys.append(f"{fixdef.baseid}::{name}[{params.get(name, '')}]")
    return keys


def _group_by_shared_fixtures(items: list[pytest.Item]) -> dict[int, str]:
    """Union-find over items: two tests using one fixture instance share a group."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_user: dict[str, int] = {}
    for i, item in enumerate(items):
        for key in _shared_fixture_keys(item):
            if key in first_user:
                parent[find(i)] = find(first_user[key])
            else:
                first_user[key] = i
    members: dict[int, list[int]] = {}
    for i in range(len(items)):
        members.setdefault(find(i), []).append(i)
    groups = {}
    for root, idx in members.items():
        if len(idx) > 1:
            for i in idx:
                groups[i] = f"shared:{items[root].nodeid}"
    return groups


def order_items(items: list[pytest.Item], durations: dict[str, float]) -> dict[str, str]:
    """Sorts `items` in place, longest unit first; returns the unit name of each node id."""
    groups = _group_by_shared_fixtures(items)
    units: dict[str, list[pytest.Item]] = {}
    for i, item in enumerate(items):
        mark = item.get_closest_marker("xdist_group")
        name = mark.args[0] if mark and mark.args else groups.get(i, item.nodeid)
        units.setdefault(name, []).append(item)

    def seconds(unit: list[pytest.Item]) -> float:
        return sum(durations.get(it.nodeid, UNKNOWN_SECONDS) for it in unit)

    # sorted() is stable: equal estimates keep collection order, so every worker sorts
    # the same collection the same way (xdist checks that they agree).
    ordered = sorted(units.items(), key=lambda kv: seconds(kv[1]), reverse=True)
    items[:] = [it for _, unit in ordered for it in unit]
    return {it.nodeid: name for name, unit in ordered for it in unit}


def write_units(path: str, units: dict[str, str]) -> None:
    """Writes the node id -> unit map for the controller (atomically: two workers write)."""
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(units, f)
    os.replace(tmp, path)


class UnitScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with this suite's units as scopes, in collection order.

    A worker gets a new unit whenever it has two tests or fewer left (xdist's rule), so
    the long units at the front of the collection start first and the short ones fill in.
    """

    def __init__(self, config: pytest.Config, log: Any = None, units_path: str = ""):
        super().__init__(config, log)
        self.units_path = units_path
        self._units: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._units is None:
            with open(self.units_path) as f:
                self._units = json.load(f)
        return self._units.get(nodeid, nodeid)


class DurationRecorder:
    """Collects per-test seconds in the controlling process and writes durations.json."""

    def __init__(self, path: str = DURATIONS):
        self.path = path
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid.split("@")[0]  # loadgroup appends "@group" to node ids
        self.seconds[nodeid] = self.seconds.get(nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput"):
            return
        with open(self.path, "w") as f:
            json.dump(dict(sorted(self.seconds.items())), f, indent=0)
            f.write("\n")
