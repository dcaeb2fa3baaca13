"""deploy/helm/provider-agent: rendered with its default values and with ci/full-values.yaml
(every option on), linted, every object validated strictly, and what the pod would run checked
against the agent itself: its config loader, `provider-agent validate`, its API-key reader."""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from provider_agent.backends.base import read_api_key
from provider_agent.config.load import parse
from tests.deploy import helm_chart
from tests.deploy.helm_chart import (
    CUSTOM_KINDS,
    Rendered,
    default_values,
    full_values,
    lint,
    pod_environment,
    render,
    validate_core,
    validate_custom,
)

DEFAULT_KINDS = {"ServiceAccount", "ConfigMap", "DaemonSet"}
FULL_KINDS = DEFAULT_KINDS | {"Secret", "Service", "ServiceMonitor", "PrometheusRule"}


def env_values() -> dict[str, Any]:
    """The full values with the API keys as environment variables instead of files."""
    values = full_values()
    values["apiKeys"]["exposeAs"] = "env"
    return values


def with_config(values: dict[str, Any] | None, old: str, new: str) -> dict[str, Any]:
    """`values` (default: the chart's) with one edit to its agent.toml text."""
    values = default_values() if values is None else values
    assert old in values["config"], old
    values["config"] = values["config"].replace(old, new)
    return values


CASES = {
    "default": lambda: None,
    "full": full_values,
    "env": env_values,
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[dict[str, Any] | None, Rendered]:
    values = CASES[request.param]()
    return values, render(values)


def secret_values(values: dict[str, Any]) -> list[str]:
    secrets = list(values["apiKeys"]["values"].values())
    return [*secrets, values["enrollmentCode"]] if values["enrollmentCode"] else secrets


# --- the whole chart -------------------------------------------------------------------------


def test_every_object_validates_strictly(
    case: tuple[dict[str, Any] | None, Rendered],
) -> None:
    values, rendered = case
    assert rendered.kinds() == (DEFAULT_KINDS if values is None else FULL_KINDS)
    for obj in rendered.objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            validate_custom(obj)
        else:
            validate_core(obj)
            assert obj["metadata"].get("namespace", helm_chart.NAMESPACE) == helm_chart.NAMESPACE


def test_strict_validation_catches_a_wrong_field() -> None:
    """The validation above can fail: a misspelt field and a mistyped one are refused."""
    daemonset = render().one("DaemonSet")
    daemonset["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(AssertionError, match="terminationGracePeriod"):
        validate_core(daemonset)
    port = render().agent()["ports"][0]
    daemonset = render().one("DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0] = {**port, "hostPort": "x"}
    with pytest.raises(AssertionError, match="hostPort"):
        validate_core(daemonset)


@pytest.mark.parametrize("name", ["default", "full"])
def test_helm_lint_strict_is_clean(name: str) -> None:
    assert lint(CASES[name]()) == []


def test_helm_lint_reports_values_the_schema_refuses() -> None:
    """The lint above can fail. (Helm lints in "lint mode", where a template's `fail` is only
    logged: the chart's refusals of a config are caught by rendering, below.)"""
    problems = lint({"hostNetwrk": False})
    assert any("'hostNetwrk' not allowed" in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            with_config(None, '"0.0.0.0:9821"', '"127.0.0.1:9821"'),
            r'prometheus_addr "127.0.0.1:9821" is loopback',
        ),
        (
            with_config(None, '"0.0.0.0:9821"', '"[::1]:9821"'),
            r'prometheus_addr "\[::1\]:9821" is loopback',
        ),
        (
            with_config(None, 'prometheus_addr = "0.0.0.0:9821"\n', ""),
            r'prometheus_addr "127.0.0.1:9821" is loopback',
        ),
        (
            with_config(None, '"0.0.0.0:9821"', '""'),
            "the pod needs the HTTP endpoint for its probes",
        ),
        (
            with_config(
                None, "[state]\n", '[identity]\nkey_path = "/home/agent/id.key"\n[state]\n'
            ),
            r'key_path "/home/agent/id.key" is not under state.mountPath',
        ),
        (
            with_config(None, 'url = "http://127.0.0.1:8000"', 'url = "x"\napi_key_env = "K1"'),
            r"backends\[0\].api_key_env names K1, but apiKeys.values has no key K1",
        ),
        (with_config(None, "[pricing]", "[pricing"), "config: not valid TOML"),
    ],
    ids=["loopback", "ipv6-loopback", "default-loopback", "disabled", "key-path", "no-key", "toml"],
)
def test_chart_refuses_a_config_the_pod_could_not_run(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"hostNetwrk": False}, "'hostNetwrk' not allowed"),
        ({"apiKeys": {"values": {"OPENROUTER-KEY": "k"}}}, "'OPENROUTER-KEY'"),
        ({"apiKeys": {"exposeAs": "volume"}}, "exposeAs"),
        ({"terminationGraceMarginSeconds": 0}, "terminationGraceMarginSeconds"),
    ],
    ids=["typo", "env-name", "expose", "margin"],
)
def test_values_schema_refuses_mistakes(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render(values)


# --- the pod ---------------------------------------------------------------------------------


def test_probes_use_the_endpoint_the_config_binds(
    case: tuple[dict[str, Any] | None, Rendered],
) -> None:
    """The agent's own loader reads the rendered config's endpoint: all interfaces (the kubelet
    probes the pod's IP), on the port the container declares and the probes use."""
    values, rendered = case
    listen = parse(rendered.agent_toml()).observability.listen
    assert listen is not None
    host, port = listen
    assert host == "0.0.0.0"
    agent = rendered.agent()
    [declared] = agent["ports"]
    assert (declared["name"], declared["containerPort"], declared["protocol"]) == (
        "metrics",
        port,
        "TCP",
    )
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz")]:
        assert agent[probe]["httpGet"] == {"path": path, "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    pod = rendered.pod()
    if (values or default_values())["hostNetwork"]:
        assert pod["hostNetwork"] is True
        assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert declared["hostPort"] == port
    else:
        assert pod["hostNetwork"] is False
        assert pod["dnsPolicy"] == "ClusterFirst"
        assert "hostPort" not in declared
    if values is not None:
        [service_port] = rendered.one("Service")["spec"]["ports"]
        assert (service_port["port"], service_port["targetPort"]) == (port, "metrics")
        [endpoint] = rendered.one("ServiceMonitor")["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")


@pytest.mark.parametrize("drain", [None, "0", "60", "59.2", "300.5", "3600"])
def test_grace_period_is_above_drain_timeout(drain: str | None) -> None:
    """drain_timeout_s as the rendered config has it (60 when absent), rounded up, plus the
    margin; None: the config leaves it out."""
    new = "" if drain is None else f"drain_timeout_s = {drain}\n"
    values = with_config(None, "drain_timeout_s = 60\n", new)
    rendered = render(values)
    drain_s = rendered.config()["state"].get("drain_timeout_s", 60)
    assert (drain is None) == ("drain_timeout_s" not in rendered.config()["state"])
    grace = rendered.pod()["terminationGracePeriodSeconds"]
    assert grace > drain_s
    assert grace == math.ceil(drain_s) + values["terminationGraceMarginSeconds"]


def test_grace_period_of_every_case(case: tuple[dict[str, Any] | None, Rendered]) -> None:
    _, rendered = case
    drain_s = rendered.config().get("state", {}).get("drain_timeout_s", 60)
    assert rendered.pod()["terminationGracePeriodSeconds"] > drain_s


def test_container_runs_the_config_of_the_configmap(
    case: tuple[dict[str, Any] | None, Rendered],
) -> None:
    values, rendered = case
    agent = rendered.agent()
    assert agent["args"][0] == "run"
    config_path = Path(agent["args"][agent["args"].index("--config") + 1])
    assert rendered.env()["PROVIDER_AGENT_CONFIG"]["value"] == str(config_path)
    [mount] = [m for m in agent["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert mount["readOnly"] is True
    [volume] = [v for v in rendered.pod()["volumes"] if v["name"] == mount["name"]]
    configmap = rendered.one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert set(configmap["data"]) == {config_path.name}
    source = (values or default_values())["config"]
    assert rendered.agent_toml() == source.rstrip("\n") + "\n", "the config is not verbatim"


def test_config_change_rolls_the_pods() -> None:
    annotation = "checksum/config"
    first = render().one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    again = render().one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    changed = render(with_config(None, "drain_timeout_s = 60", "drain_timeout_s = 61"))
    after = changed.one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert first[annotation] == again[annotation] != after[annotation]


def test_state_and_identity_live_on_the_node(
    case: tuple[dict[str, Any] | None, Rendered], monkeypatch: pytest.MonkeyPatch
) -> None:
    values, rendered = case
    state = (values or default_values())["state"]
    pod = rendered.pod()
    [volume] = [v for v in pod["volumes"] if "hostPath" in v]
    assert volume["hostPath"] == {"path": state["hostPath"], "type": "DirectoryOrCreate"}
    agent = rendered.agent()
    [mount] = [m for m in agent["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == state["mountPath"]
    assert not mount.get("readOnly", False)
    assert rendered.env()["STATE_DIRECTORY"]["value"] == state["mountPath"]
    # The agent's loader, with the pod's $STATE_DIRECTORY: state and identity key on the volume.
    monkeypatch.setenv("STATE_DIRECTORY", state["mountPath"])
    config = parse(rendered.agent_toml())
    assert config.state.dir == Path(state["mountPath"])
    assert config.identity.key_path.parent == Path(state["mountPath"])
    # A non-root agent, and an init container that gives it the host directory.
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert uid > 0 and gid > 0 and pod["securityContext"]["runAsNonRoot"] is True
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    [init] = pod["initContainers"]
    assert init["image"] == agent["image"]
    assert f"chown -R {uid}:{gid} {state['mountPath']} " in init["command"][-1]
    assert [m["mountPath"] for m in init["volumeMounts"]] == [state["mountPath"]]
    assert set(init["securityContext"]["capabilities"]["add"]) == {
        "CHOWN",
        "FOWNER",
        "DAC_READ_SEARCH",
    }


# --- API keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["full", "env"])
def test_api_keys_reach_the_agent_under_their_api_key_env(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every api_key_env of the config is a key of the Secret, and the agent's own key reader,
    in the environment the kubelet would give the container, reads the operator's key."""
    values = CASES[name]()
    assert values is not None
    rendered = render(values)
    names = {b["api_key_env"] for b in rendered.config()["backends"] if "api_key_env" in b}
    assert names == {"VLLM_API_KEY", "OPENROUTER_API_KEY", "VENICE_API_KEY"}
    assert names <= set(rendered.secret_data())
    env = pod_environment(rendered, tmp_path)
    if values["apiKeys"]["exposeAs"] == "files":
        assert env["CREDENTIALS_DIRECTORY"] == str(tmp_path / "credentials")
        assert names.isdisjoint(env)
    else:
        assert "CREDENTIALS_DIRECTORY" not in env
        assert names <= set(env)
    assert env["PROVIDER_AGENT_ENROLLMENT_CODE"] == values["enrollmentCode"]
    for variable in [*names, "CREDENTIALS_DIRECTORY"]:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    for key_name in names:
        assert read_api_key(key_name) == values["apiKeys"]["values"][key_name]


@pytest.mark.parametrize("expose", ["files", "env"])
def test_existing_secret_is_used_and_no_secret_is_made(expose: str) -> None:
    values = full_values()
    values["apiKeys"] = {"values": {}, "existingSecret": "gpu-keys", "exposeAs": expose}
    values["enrollmentCode"] = ""
    rendered = render(values)
    assert "Secret" not in rendered.kinds()
    env = rendered.env()
    enrollment = env["PROVIDER_AGENT_ENROLLMENT_CODE"]["valueFrom"]["secretKeyRef"]
    assert enrollment == {
        "name": "gpu-keys",
        "key": "PROVIDER_AGENT_ENROLLMENT_CODE",
        "optional": True,
    }
    volumes = [v for v in rendered.pod()["volumes"] if "secret" in v]
    if expose == "files":
        assert [v["secret"]["secretName"] for v in volumes] == ["gpu-keys"]
    else:
        assert volumes == []
        assert env["OPENROUTER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "gpu-keys",
            "key": "OPENROUTER_API_KEY",
        }


@pytest.mark.parametrize("name", ["full", "env"])
def test_no_secret_value_outside_the_secret(name: str) -> None:
    values = CASES[name]()
    assert values is not None
    rendered = render(values)
    secrets = secret_values(values)
    assert len(secrets) == 4
    for obj in rendered.objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for secret in secrets:
            encoded = base64.b64encode(secret.encode()).decode()
            assert secret not in text and encoded not in text, f"a secret in the {obj['kind']}"
    assert set(secrets) <= set(rendered.secret_data().values())


# --- the agent accepts what the chart renders -----------------------------------------------


@pytest.mark.parametrize("name", ["default", "full"])
def test_rendered_config_is_accepted_and_runs(name: str, tmp_path: Path) -> None:
    """`provider-agent validate` accepts the rendered agent.toml in the pod's environment, and
    `provider-agent identity` run twice there (two pod lifetimes on one node's state directory)
    keeps one identity, stored in the state directory."""
    rendered = render(CASES[name]())
    config_file = tmp_path / "agent.toml"
    config_file.write_text(rendered.agent_toml(), encoding="utf-8")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    env |= pod_environment(rendered, tmp_path)
    env["PROVIDER_AGENT_CONFIG"] = str(config_file)

    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "provider_agent", *args, "--config", str(config_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    validated = agent("validate")
    assert validated.returncode == 0, validated.stderr
    backends = len(rendered.config()["backends"])
    assert validated.stdout.strip() == f"ok: {backends} backend(s)"
    first, second = agent("identity"), agent("identity")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    assert f"key_file: {tmp_path / 'state' / 'identity.key'}" in first.stdout


# --- Prometheus Operator objects ------------------------------------------------------------


def test_prometheus_rule_carries_the_alert_groups() -> None:
    rule = render(full_values()).one("PrometheusRule")
    alerts = yaml.safe_load(helm_chart.CHART_ALERTS.read_text(encoding="utf-8"))
    assert rule["spec"] == alerts
    validate_custom(rule)


def test_service_monitor_selects_only_the_metrics_service() -> None:
    rendered = render(full_values())
    selector = rendered.one("ServiceMonitor")["spec"]["selector"]["matchLabels"]
    service = rendered.one("Service")
    assert selector.items() <= service["metadata"]["labels"].items()
    pod_labels = rendered.one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert rendered.one("ServiceMonitor")["spec"]["jobLabel"] in service["metadata"]["labels"]


def test_chart_alerts_are_deploy_prometheus_alerts() -> None:
    if not helm_chart.DEPLOY_ALERTS.exists():
        pytest.skip("deploy/prometheus/alerts.yml does not exist yet: nothing to compare with")
    assert helm_chart.CHART_ALERTS.read_bytes() == helm_chart.DEPLOY_ALERTS.read_bytes(), (
        "deploy/helm/provider-agent/files/alerts.yml differs from deploy/prometheus/alerts.yml: "
        "copy the latter over the former"
    )
