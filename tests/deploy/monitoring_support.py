"""Helpers for tests/deploy/test_monitoring.py: the shipped monitoring files, the metric names their
PromQL uses, Prometheus' own tools (scripts/test installs them), and a real
Prometheus server on loopback with its HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import aiohttp
import anyio
import anyio.abc
import pytest
import yaml

from tests.agent_harness import free_port

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "provider-agent.json"
#: The job name the alerts' `up` rule expects (any job whose name starts with it).
JOB = "provider-agent"
#: The Grafana data source every panel and variable must use: the dashboard's own variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# --- PromQL ---------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
#: The families the agent's /metrics has: its own, and prometheus-client's process and Python ones.
_METRIC = r"(?:provider_agent_[a-z0-9_]+|process_[a-z0-9_]+|python_[a-z0-9_]+|up)"
_NAME = re.compile(rf"\b{_METRIC}\b")
_SELECTOR = re.compile(rf"\b(?P<name>{_METRIC})\b\s*(?P<matchers>\{{[^}}]*\}})?")
_BRACED = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (string literals and grouping labels left out)."""
    return set(_NAME.findall(_GROUPING.sub(" ", _STRING.sub('""', expr))))


def braced_names(expr: str) -> set[str]:
    """Every name written right before `{`: a selector's metric name, whatever its family."""
    return set(_BRACED.findall(_GROUPING.sub(" ", _STRING.sub('""', expr))))


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, its `{…}` matchers or "") for every selector of a known family."""
    bare = _GROUPING.sub(" ", expr)
    return [(m["name"], m["matchers"] or "") for m in _SELECTOR.finditer(bare)]


# --- the shipped files ----------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml."""
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(DASHBOARD.read_text()))


def query_panels(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The panels that query Prometheus (every one but rows and text)."""
    return [p for p in board["panels"] if p["type"] not in ("row", "text")]


def dashboard_exprs(board: Mapping[str, Any]) -> list[str]:
    return [t["expr"] for p in query_panels(board) for t in p["targets"]]


def variable_queries(board: Mapping[str, Any]) -> dict[str, str]:
    """The `query` variables' PromQL-ish queries (`label_values(…)`), by variable name."""
    return {
        v["name"]: v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"
    }


# --- Prometheus' tools ----------------------------------------------------------------------------


def prometheus_tools() -> dict[str, str]:
    """`promtool` and `prometheus` as absolute paths (Debian package `prometheus`, which
    scripts/test installs when missing); the test skips, saying so, where they are missing."""
    found = {tool: shutil.which(tool) for tool in ("promtool", "prometheus")}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian package `prometheus`)")
    return {tool: cast(str, path) for tool, path in found.items()}


# --- a real Prometheus ------------------------------------------------------------------------


class PrometheusError(AssertionError):
    """The API answered with an error (a bad query, a bad parameter)."""


@dataclass
class PrometheusServer:
    """A `prometheus` process on loopback and a client of its HTTP API."""

    url: str
    http: aiohttp.ClientSession
    process: anyio.abc.Process
    log: Path

    async def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """`GET /api/v1/<path>`: its `data`; PrometheusError for an answer that is not success."""
        async with self.http.get(f"{self.url}/api/v1/{path}", params=list(params)) as response:
            body = await response.json()
        if response.status != 200 or body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: HTTP {response.status} {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = await self.api("query", [("query", expr)])
        return cast(list[dict[str, Any]], data["result"])

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def until_ready(self, timeout: float) -> None:  # noqa: ASYNC109
        """Poll `/-/ready` until it answers 200 (the TSDB is open and the rules are loaded)."""
        with anyio.fail_after(timeout):
            while True:
                if self.process.returncode is not None:
                    raise AssertionError(f"prometheus exited early:\n{self.log_tail()}")
                try:
                    async with self.http.get(f"{self.url}/-/ready") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await anyio.sleep(0.1)


def prometheus_command(
    binary: str, directory: Path, targets: Sequence[str], rule_files: Sequence[Path], port: int
) -> list[str]:
    """Write `directory`/prometheus.yml (targets scraped every second in job `provider-agent`,
    `rule_files` evaluated every second) and return the command that serves it on `port`, with
    its data under `directory`/data."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    return [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=info",
    ]


def open_for_writing(path: Path) -> BinaryIO:
    return path.open("wb")


@asynccontextmanager
async def prometheus_server(
    binary: str, directory: Path, targets: Sequence[str], rule_files: Sequence[Path]
) -> AsyncIterator[PrometheusServer]:
    """A real Prometheus on a free loopback port (see `prometheus_command`), its log in
    `directory`/prometheus.log; stopped (SIGTERM, then SIGKILL after 10 s) on exit."""
    port = free_port()
    command = prometheus_command(binary, directory, targets, rule_files, port)
    log = directory / "prometheus.log"
    with open_for_writing(log) as log_file:
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            server = PrometheusServer(f"http://127.0.0.1:{port}", http, process, log)
            await server.until_ready(timeout=60)
            yield server
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(10):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
