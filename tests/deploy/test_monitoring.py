"""The shipped monitoring: Prometheus alert rules (deploy/prometheus/alerts.yml) with promtool unit
tests, a Grafana dashboard (deploy/grafana/provider-agent.json), and a real Prometheus scraping a
running agent with every metric those use present.

Grafana has no server here: the dashboard's JSON is checked for the structure Grafana needs, and
each of its queries is run by the real Prometheus against a live agent.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from provider_agent.clock import Timings
from provider_agent.daemon import Daemon
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.faults import Fault
from provider_agent.jobs.route_health import FAILURES_TO_WITHDRAW
from provider_agent.link.protocol import JobDone, JobError
from provider_agent.observe.prometheus import AgentMetrics
from tests.agent_harness import agent_where, free_port, running_agent, write_config
from tests.deploy.monitoring_support import (
    ALERT_TESTS,
    ALERTS,
    DATASOURCE,
    JOB,
    PrometheusServer,
    alert_rules,
    braced_names,
    dashboard,
    dashboard_exprs,
    metric_names,
    prometheus_server,
    prometheus_tools,
    query_panels,
    selectors,
    variable_queries,
)
from tests.jobs.test_executor import REQUEST, finished, serving
from tests.nvml_stand_in import StandInGpu, StandInNvml
from tests.observe.test_http_api import get, until_status
from tests.observe.test_telemetry import telemetry_of

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def family_names() -> dict[str, str]:
    """Every family of the agent's own registry as `/metrics` names it (`# TYPE name type`),
    labelled ones included (prometheus-client writes their HELP and TYPE before any sample)."""
    text = AgentMetrics(process_collectors=False).exposition()[0].decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def family_of(name: str, families: dict[str, str]) -> str | None:
    """The family a series name belongs to (`x_bucket` of histogram `x`, …), or None."""
    if name in families:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and families.get(base) == "histogram":
            return base
    return None


# --- the alert rules ------------------------------------------------------------------------------


def test_extracting_metric_names_from_promql() -> None:
    """The extraction the other checks rely on: grouping labels and string values are not names,
    histogram series keep their suffix, `up` is found on its own but not inside another name."""
    expr = (
        'sum by (instance, up) (rate(provider_agent_jobs_total{code="up", outcome!="done"}[5m]))'
        " / on (job, instance) group_left (version) provider_agent_build_info"
        " and histogram_quantile(0.9, sum by (le)"
        " (rate(provider_agent_job_duration_seconds_bucket[1m])))"
        ' or up{job="provider-agent"} == 0 or provider_agent_backend_up'
    )
    assert metric_names(expr) == {
        "provider_agent_jobs_total",
        "provider_agent_build_info",
        "provider_agent_job_duration_seconds_bucket",
        "up",
        "provider_agent_backend_up",
    }
    assert selectors('max by (backend) (provider_agent_backend_up{job=~"$job"}) + up') == [
        ("provider_agent_backend_up", '{job=~"$job"}'),
        ("up", ""),
    ]
    assert braced_names('node_load1{job="x"} + provider_agent_ready{a="b"}') == {
        "node_load1",
        "provider_agent_ready",
    }


def test_every_alert_has_a_severity_annotations_and_names_only_the_agents_metrics() -> None:
    rules = alert_rules()
    families = family_names()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) >= 15
    for rule in rules:
        alert = rule["alert"]
        assert alert.startswith("ProviderAgent"), alert
        assert rule["labels"]["severity"] in ("critical", "warning"), alert
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"], alert
        assert "{{ $labels.instance }}" in rule["annotations"]["description"], alert
        assert re.fullmatch(r"\d+m", rule["for"]), alert
        used = metric_names(rule["expr"])
        assert used, alert
        assert braced_names(rule["expr"]) <= used, alert  # no selector of another family
        for name in used - {"up"}:
            assert family_of(name, families) is not None, f"{alert}: {name} is not exported"
    # The alerts the operator needs, each on the metric it must watch.
    watched = {rule["alert"]: metric_names(rule["expr"]) for rule in rules}
    for alert, metric in [
        ("ProviderAgentDown", "up"),
        ("ProviderAgentNotAuthenticated", "provider_agent_session_state"),
        ("ProviderAgentNoModelAdvertised", "provider_agent_models_advertised"),
        ("ProviderAgentBackendDown", "provider_agent_backend_up"),
        ("ProviderAgentRoutesWithdrawn", "provider_agent_routes_withdrawn"),
        ("ProviderAgentOutboxGrowing", "provider_agent_outbox_depth"),
        ("ProviderAgentOutboxNotDraining", "provider_agent_outbox_oldest_age_seconds"),
        ("ProviderAgentTokenWindowFull", "provider_agent_rate_window_fill_ratio"),
        ("ProviderAgentErrorRateHigh", "provider_agent_jobs_total"),
        ("ProviderAgentGpuUnhealthy", "provider_agent_gpu_healthy"),
        ("ProviderAgentGpuHot", "provider_agent_gpu_temperature_celsius"),
        ("ProviderAgentPausedWithoutEnd", "provider_agent_pause_ends_timestamp_seconds"),
        ("ProviderAgentPausedPastPlannedEnd", "provider_agent_pause_ends_timestamp_seconds"),
    ]:
        assert metric in watched[alert], alert


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    document = yaml.safe_load(ALERT_TESTS.read_text())
    assert document["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in document["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names
    assert quiet == names


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    promtool = prometheus_tools()["promtool"]
    check = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def only_the_cases_of(alert: str) -> dict[str, Any]:
    """alerts.test.yml with only the test groups and cases about `alert` (quicker to run)."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    groups = []
    for group in tests["tests"]:
        cases = [case for case in group["alert_rule_test"] if case["alertname"] == alert]
        if cases:
            groups.append({**group, "alert_rule_test": cases})
    assert groups, alert
    return {**tests, "tests": groups}


def test_the_unit_tests_catch_an_alert_that_never_fires_or_fires_too_soon(tmp_path: Path) -> None:
    """For every alert, two broken copies of alerts.yml: its expression matching nothing, and its
    `for:` gone. The unit tests must fail on each copy, naming that alert (one promtool run)."""
    promtool = prometheus_tools()["promtool"]
    document = yaml.safe_load(ALERTS.read_text())
    copies: dict[Path, str] = {}
    for group_index, group in enumerate(document["groups"]):
        for rule_index, rule in enumerate(group["rules"]):
            tests = only_the_cases_of(rule["alert"])
            for breakage, change in (
                ("never", {"expr": "vector(1) == 0"}),
                ("soon", {"for": "0m"}),
            ):
                broken = yaml.safe_load(yaml.safe_dump(document))
                broken["groups"][group_index]["rules"][rule_index].update(change)
                directory = tmp_path / f"{rule['alert']}-{breakage}"
                directory.mkdir()
                (directory / ALERTS.name).write_text(yaml.safe_dump(broken, sort_keys=False))
                (directory / ALERT_TESTS.name).write_text(yaml.safe_dump(tests, sort_keys=False))
                copies[directory / ALERT_TESTS.name] = rule["alert"]
    done = subprocess.run(
        [promtool, "test", "rules", *map(str, copies)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    reports = {
        chunk.split("\n", 1)[0].strip(): chunk for chunk in done.stdout.split("Unit Testing:")[1:]
    }
    assert set(reports) == set(map(str, copies))
    for path, alert in copies.items():
        report = reports[str(path)]
        assert "FAILED" in report, f"{path.parent.name}: the unit tests did not notice"
        assert f"alertname: {alert}," in report, path.parent.name


# --- the dashboard --------------------------------------------------------------------------------


def overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_the_dashboard_is_well_formed_with_datasource_job_and_instance_variables() -> None:
    board = dashboard()
    assert board["uid"] == "provider-agent" and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert "earnings" in board["description"].lower()  # says why there is no earnings panel
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["multi"] and variable["includeAll"]  # one host, several, or the fleet
    queries = variable_queries(board)
    assert queries["job"] == "label_values(provider_agent_build_info, job)"
    assert queries["instance"] == 'label_values(provider_agent_build_info{job=~"$job"}, instance)'

    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert all(isinstance(v, int) and v >= 0 for v in grid.values()), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["title"] and panel["type"]
    for i, first in enumerate(panels):
        for second in panels[i + 1 :]:
            assert not overlaps(first["gridPos"], second["gridPos"]), (
                first["title"],
                second["title"],
            )
    assert [p["title"] for p in panels if p["type"] == "row"] == [
        "Overview",
        "Session and backends",
        "Jobs",
        "Billing outbox and token window",
        "Routes",
        "GPUs",
    ]
    for panel in query_panels(board):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_dashboard_query_selects_by_job_and_instance() -> None:
    for expr in dashboard_exprs(dashboard()):
        found = selectors(expr)
        assert found, expr
        assert braced_names(expr) <= {name for name, _ in found}, expr  # no other family
        for name, matchers in found:
            assert 'job=~"$job"' in matchers, (name, expr)
            assert 'instance=~"$instance"' in matchers, (name, expr)


def test_the_dashboard_shows_what_an_operator_watches_and_the_alerts_cover_the_rest() -> None:
    """Every name the dashboard queries is a family the agent exports (or a series of one), and
    together with the alerts every one of the agent's families is looked at somewhere."""
    board = dashboard()
    families = family_names()
    shown = {name for expr in dashboard_exprs(board) for name in metric_names(expr)}
    for name in shown:
        assert name.startswith("process_") or family_of(name, families), name
    for required in (
        "provider_agent_session_state",
        "provider_agent_models_advertised",
        "provider_agent_jobs_total",
        "provider_agent_job_time_to_first_byte_seconds_bucket",
        "provider_agent_relayed_bytes_total",
        "provider_agent_outbox_depth",
        "provider_agent_outbox_oldest_age_seconds",
        "provider_agent_rate_window_tokens",
        "provider_agent_rate_window_fill_ratio",
        "provider_agent_gpu_utilization_ratio",
        "provider_agent_gpu_memory_used_bytes",
        "provider_agent_gpu_temperature_celsius",
        "provider_agent_gpu_healthy",
    ):
        assert required in shown, required
    alerted = {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    looked_at = {family_of(name, families) for name in shown | alerted} - {None}
    assert looked_at == set(families)


# --- a real Prometheus scraping a running agent ---------------------------------------------------

HOT_GPU = "GPU-0ddba11-0000-0000-0000-000000000001"


async def run_job(coord: DevCoordinator, pid: str, model: str) -> JobDone | JobError:
    job = await coord.send_job(pid, model, REQUEST)
    terminal = (await finished(coord, job.job_id)).terminal
    assert isinstance(terminal, JobDone | JobError)
    return terminal


def substitute(expr: str, instance: str) -> str:
    """A dashboard query as Grafana sends it with one job and one instance picked (a regex
    variable's value is escaped) and `$__rate_interval` at a minute (60 one-second scrapes)."""
    text = (
        expr.replace("$job", JOB)
        .replace("$instance", re.escape(instance).replace("\\", "\\\\"))
        .replace("$__rate_interval", "1m")
    )
    assert "$" not in text, text
    return text


#: Alerts the scenario below puts in trouble: pending (their `for:` is minutes) with these labels.
EXPECTED_PENDING = {
    "ProviderAgentBackendDown",
    "ProviderAgentRoutesWithdrawn",
    "ProviderAgentGpuUnhealthy",
    "ProviderAgentGpuHot",
}
#: Alerts that must be quiet once the scenario has settled.
EXPECTED_QUIET = {
    "ProviderAgentDown",
    "ProviderAgentNotAuthenticated",
    "ProviderAgentNotReady",
    "ProviderAgentNoModelAdvertised",
    "ProviderAgentSessionFlapping",
    "ProviderAgentRoutesFlapping",
    "ProviderAgentOutboxNotDraining",
    "ProviderAgentOutboxStale",
    "ProviderAgentOutboxGrowing",
    "ProviderAgentTokenWindowFull",
    "ProviderAgentPausedWithoutEnd",
    "ProviderAgentPausedPastPlannedEnd",
}


async def problems(
    prom: PrometheusServer, instance: str, wanted: set[str], pending: dict[str, dict[str, str]]
) -> list[str]:
    """What Prometheus does not show yet: metric names missing from the agent's series, dashboard
    queries with no result, pending alerts missing or unexpected ones active."""
    found: list[str] = []
    up = await prom.query(f'up{{job="{JOB}", instance="{instance}"}}')
    if [sample["value"][1] for sample in up] != ["1"]:
        found.append(f"the target is not up: {up}")
    names = set(await prom.api("label/__name__/values", [("match[]", f'{{job="{JOB}"}}')]))
    found += [f"no series named {name}" for name in sorted(wanted - names)]
    for expr in dashboard_exprs(dashboard()):
        if not await prom.query(substitute(expr, instance)):
            found.append(f"no result for the dashboard's {expr}")
    active = {
        (alert["labels"]["alertname"], alert["state"], frozenset(alert["labels"].items()))
        for alert in (await prom.api("alerts"))["alerts"]
    }
    for name, labels in pending.items():
        if not any(a == name and labels.items() <= set(ls) for a, _, ls in active):
            found.append(f"{name} is not active with {labels}: {active}")
    found += [f"{name} is {state}" for name, state, _ in active if name in EXPECTED_QUIET]
    return found


async def put_through_its_paces(
    coord: DevCoordinator, daemon: Daemon, flaky: SimBackend, sick: SimBackend
) -> None:
    """Jobs done on every backend and one refused; a discovery pass that spares the backends
    those jobs showed healthy; flaky's and sick's routes withdrawn by failing jobs, flaky's
    restored by a probe; the link cut, so the agent redials."""
    pid = await serving(coord, "m")
    for model in ("flaky", "sick"):
        await serving(coord, model)
    for model in ("m", "flaky", "sick"):
        assert isinstance(await run_job(coord, pid, model), JobDone)
    refused = await run_job(coord, pid, "no-such-model")
    assert isinstance(refused, JobError) and refused.error_code == "model_not_loaded"
    discovery = daemon.agent.discovery
    passes = discovery.passes
    daemon.agent.passes.request()
    await coord.wait_for(lambda _: discovery.passes > passes)

    flaky.fault = sick.fault = Fault(kind="http", status=500)
    for model in ("flaky", "sick"):
        for _ in range(FAILURES_TO_WITHDRAW):
            assert isinstance(await run_job(coord, pid, model), JobError)
    await agent_where(coord, lambda a: not {"flaky", "sick"} & set(a.offers()))
    flaky.fault = None  # the next probe restores it; sick's keep failing
    await agent_where(coord, lambda a: "flaky" in a.offers(), timeout=10)
    await coord.drop(pid)


def names_used() -> set[str]:
    """Every metric name of every alert, dashboard query and dashboard variable."""
    board = dashboard()
    names = {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    names |= {name for expr in dashboard_exprs(board) for name in metric_names(expr)}
    return names | {n for q in variable_queries(board).values() for n in metric_names(q)}


async def until_no_problems(
    prom: PrometheusServer, instance: str, wanted: set[str], pending: dict[str, dict[str, str]]
) -> list[str]:
    """Ask Prometheus until `problems` finds none (scrapes and rule evaluations come every
    second), for at most 30 s; the problems left."""
    left: list[str] = []
    with anyio.move_on_after(30):
        while True:
            left = await problems(prom, instance, wanted, pending)
            if not left:
                break
            await anyio.sleep(0.25)
    return left


async def test_a_real_prometheus_scrapes_every_alert_and_panel_metric_from_a_running_agent(
    tmp_path: Path,
) -> None:
    """An agent with four backends (one dead, one whose route is withdrawn for good, one
    withdrawn and restored) and two GPUs (one at its slowdown temperature) serves jobs (done,
    failed, refused), spares probes, loses its session and redials. A real Prometheus scrapes it
    every second with alerts.yml loaded: every metric name of every alert and panel is among
    its series, every dashboard query has a result, every rule is healthy, and the alerts for
    this host's troubles are pending with its labels."""
    prometheus = prometheus_tools()["prometheus"]
    port = free_port()
    instance = f"127.0.0.1:{port}"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    nvml = StandInNvml(StandInGpu(), StandInGpu(uuid=HOT_GPU, temperature=90, slowdown=90))
    async with (
        DevCoordinator(host="127.0.0.1", port=0) as coord,
        SimBackend("vllm", ["m"], tokens=3, tokens_per_s=0) as good,
        SimBackend("vllm", ["flaky"], tokens=3, tokens_per_s=0) as flaky,
        SimBackend("vllm", ["sick"], tokens=3, tokens_per_s=0) as sick,
        prometheus_server(prometheus, tmp_path / "prometheus", [instance], [ALERTS]) as prom,
        aiohttp.ClientSession() as http,
    ):
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(good.base_url, flaky.base_url, sick.base_url, dead),
            heartbeat_interval_s=1,
            prometheus_addr=instance,
        )
        timings = Timings(route_probe_s=0.3)
        async with running_agent(cfg, timings=timings, telemetry=telemetry_of(nvml)) as daemon:
            await put_through_its_paces(coord, daemon, flaky, sick)
            settled = await until_status(
                http,
                port,
                lambda s: (
                    s.session.authenticated
                    and s.session.reconnects >= 1
                    and len(s.gpus) == 2
                    and [r.backend for r in s.withdrawn_routes] == [f"vllm:{sick.base_url}"]
                ),
            )
            assert not settled.gpus[1].healthy

            code, text = await get(http, port, "/metrics")
            assert code == 200
            exported = {
                sample.name
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }
            declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))

            alerts = {rule["alert"]: rule for rule in alert_rules()}
            wanted = names_used()
            # The agent exports every one of them (`up` is Prometheus' own), each family
            # with its HELP and TYPE.
            assert wanted - {"up"} <= exported, sorted(wanted - {"up"} - exported)
            assert set(family_names()) <= declared

            target = {"job": JOB, "instance": instance}
            pending = {
                "ProviderAgentBackendDown": {**target, "backend": f"vllm:{dead}", "kind": "vllm"},
                "ProviderAgentRoutesWithdrawn": {**target, "backend": f"vllm:{sick.base_url}"},
                "ProviderAgentGpuUnhealthy": {**target, "index": "1", "uuid": HOT_GPU},
                "ProviderAgentGpuHot": {**target, "index": "1", "uuid": HOT_GPU},
            }
            assert set(pending) == EXPECTED_PENDING
            # The error rate alert alone may be either: that depends on how the scrapes fell
            # between the failing jobs (a counter's first value is no increase to `rate`).
            assert EXPECTED_PENDING | EXPECTED_QUIET | {"ProviderAgentErrorRateHigh"} == set(alerts)
            left = await until_no_problems(prom, instance, wanted, pending)
            assert left == [], "\n".join(left)

            rules = await rules_of(prom)
            values = await prom.api("label/job/values", [("match[]", "provider_agent_build_info")])
            instances = await prom.api(
                "label/instance/values", [("match[]", f'provider_agent_build_info{{job=~"{JOB}"}}')]
            )
            for rule in alerts.values():  # each expression runs as a query too
                await prom.query(rule["expr"])
    assert {name: rule["health"] for name, rule in rules.items()} == dict.fromkeys(alerts, "ok")
    assert all(not rule.get("lastError") for rule in rules.values())
    assert values == [JOB] and instances == [instance]  # the variables' choices
    check_log(prom)
    coord.assert_no_violations()


async def rules_of(prom: PrometheusServer) -> dict[str, dict[str, Any]]:
    """The loaded alerting rules by name."""
    groups = (await prom.api("rules", [("type", "alert")]))["groups"]
    assert [group["name"] for group in groups] == ["provider-agent"]
    return {rule["name"]: rule for group in groups for rule in group["rules"]}


def check_log(prom: PrometheusServer) -> None:
    """Prometheus loaded its config (and the rules) and logged no error."""
    log = prom.log.read_text(errors="replace")
    assert "Completed loading of configuration file" in log, log[-3000:]
    assert "level=error" not in log, log[-3000:]
