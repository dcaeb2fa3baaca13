"""The Helm chart in deploy/helm/provider-agent, rendered, linted and validated offline.

`render(values)` is `helm template` through helm-python's bundled Helm SDK (no helm binary, no
cluster): every rendered object, parsed. `validate_core` checks an object of the Kubernetes API
against the strict schemas kubernetes-validate ships (unknown fields are errors);
`validate_custom` checks the two Prometheus Operator objects, which it has no schema for, by
their shape.
"""

from __future__ import annotations

import base64
import copy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import yaml

REPO: Final = Path(__file__).resolve().parents[2]
CHART: Final = REPO / "deploy" / "helm" / "provider-agent"
FULL_VALUES: Final = CHART / "ci" / "full-values.yaml"
CHART_ALERTS: Final = CHART / "files" / "alerts.yml"
DEPLOY_ALERTS: Final = REPO / "deploy" / "prometheus" / "alerts.yml"
RELEASE: Final = "pa"
NAMESPACE: Final = "gpu"
#: The Kubernetes API the objects are validated against: the newest schemas shipped.
KUBE_VERSION: Final[str] = kubernetes_validate.latest_version()
#: The objects kubernetes-validate has no schema for (validate_custom checks their shape).
CUSTOM_KINDS: Final = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

Obj = dict[str, Any]


def full_values() -> dict[str, Any]:
    """ci/full-values.yaml: every option switched on (a fresh copy each call)."""
    values = yaml.safe_load(FULL_VALUES.read_text(encoding="utf-8"))
    assert isinstance(values, dict)
    return values


def default_values() -> dict[str, Any]:
    """The chart's own values.yaml, as Helm merges it."""
    with helm_python.Chart.load(CHART) as chart:
        values: dict[str, Any] = copy.deepcopy(chart.values)
    return values


@dataclass(frozen=True)
class Rendered:
    """One `helm template`: the objects in template order, and NOTES.txt."""

    objects: list[Obj]
    notes: str

    def kinds(self) -> set[str]:
        return {obj["kind"] for obj in self.objects}

    def one(self, kind: str) -> Obj:
        found = [obj for obj in self.objects if obj["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    def pod(self) -> Obj:
        spec: Obj = self.one("DaemonSet")["spec"]["template"]["spec"]
        return spec

    def agent(self) -> Obj:
        containers: list[Obj] = [c for c in self.pod()["containers"] if c["name"] == "agent"]
        assert len(containers) == 1
        return containers[0]

    def agent_toml(self) -> str:
        text: str = self.one("ConfigMap")["data"]["agent.toml"]
        return text

    def config(self) -> dict[str, Any]:
        return tomllib.loads(self.agent_toml())

    def env(self) -> dict[str, Obj]:
        """The agent container's environment, by name."""
        return {entry["name"]: entry for entry in self.agent().get("env", [])}

    def secret_data(self) -> dict[str, str]:
        """The chart-made Secret's keys and their decoded values."""
        data: dict[str, str] = self.one("Secret")["data"]
        return {key: base64.b64decode(value).decode("utf-8") for key, value in data.items()}


def render(values: Mapping[str, Any] | None = None) -> Rendered:
    """The chart rendered with `values` over its defaults (raises helm_python's errors)."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(
            None if values is None else dict(values), name=RELEASE, namespace=NAMESPACE
        )
    objects: list[Obj] = []
    notes = ""
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            notes = manifests[path]
            continue
        for document in yaml.safe_load_all(manifests[path]):
            if document is not None:
                assert isinstance(document, dict), f"{path}: not an object"
                objects.append(document)
    return Rendered(objects, notes)


def lint(values: Mapping[str, Any] | None = None) -> list[str]:
    """`helm lint --strict` against KUBE_VERSION: every warning and error, one line each
    (informational findings, such as "icon is recommended", are not problems)."""
    report = helm_python.lint(
        CHART,
        None if values is None else dict(values),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    problems = [str(error) for error in report.get("errors") or []]
    for message in report.get("messages") or []:
        if message["severity"] >= 2:
            problems.append(f"{message['path']}: {message['error']}")
    assert report["total_charts_linted"] == 1
    return problems


def validate_core(obj: Obj) -> None:
    """Strict schema validation of a core object; AssertionError naming the field otherwise."""
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.absolute_path) or "(top)"
        raise AssertionError(f"{obj['kind']} {where}: {exc.message}") from None


def _metadata(obj: Obj) -> None:
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, sorted(obj)
    metadata = obj["metadata"]
    assert isinstance(metadata["name"], str) and metadata["name"]
    assert metadata["namespace"] == NAMESPACE
    assert all(isinstance(v, str) for v in metadata["labels"].values())


def validate_rule_groups(spec: Obj) -> None:
    """The shape of a Prometheus rule file / PrometheusRule spec: named groups of rules, each an
    alert or a recording rule with an expression."""
    assert set(spec) == {"groups"}, sorted(spec)
    assert spec["groups"], "no rule groups"
    names = [group["name"] for group in spec["groups"]]
    assert len(set(names)) == len(names), f"duplicate group names: {names}"
    for group in spec["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "labels", "query_offset"}
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str | int) and str(rule["expr"]).strip(), rule
            allowed = {"alert", "record", "expr", "for", "keep_firing_for", "labels"}
            allowed |= {"annotations"} if "alert" in rule else set()
            assert set(rule) <= allowed, f"unexpected keys in {rule}"
            for table in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(table, {}).values()), rule


def validate_custom(obj: Obj) -> None:
    """ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1) by their shape."""
    assert (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS, (obj["apiVersion"], obj["kind"])
    _metadata(obj)
    spec = obj["spec"]
    if obj["kind"] == "PrometheusRule":
        validate_rule_groups(spec)
        return
    assert set(spec) <= {"jobLabel", "selector", "namespaceSelector", "endpoints"}, sorted(spec)
    assert spec["selector"]["matchLabels"], "a ServiceMonitor selecting every Service"
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        for relabeling in endpoint.get("relabelings", []):
            assert set(relabeling) <= {"sourceLabels", "targetLabel", "action", "regex"}


def pod_environment(rendered: Rendered, root: Path) -> dict[str, str]:
    """The agent container's environment as the kubelet would build it, with the pod's volumes
    materialised under `root`: the state hostPath at root/state, the credentials Secret volume
    (its keys as files) at root/credentials. Secret references are resolved from the rendered
    Secret; an optional reference to a missing key leaves the variable unset, as the kubelet
    does. Only the chart-made Secret can be resolved."""
    agent = rendered.agent()
    volumes = {volume["name"]: volume for volume in rendered.pod()["volumes"]}
    secret = rendered.secret_data() if "Secret" in rendered.kinds() else {}
    places: dict[str, Path] = {}
    for mount in agent["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            places[mount["mountPath"]] = root / "state"
        elif "secret" in volume:
            assert volume["secret"]["secretName"] == rendered.one("Secret")["metadata"]["name"]
            directory = root / "credentials"
            directory.mkdir(parents=True)
            for key, value in secret.items():
                (directory / key).write_text(value, encoding="utf-8")
            places[mount["mountPath"]] = directory
    env: dict[str, str] = {}
    for entry in agent.get("env", []):
        if "value" in entry:
            value = entry["value"]
            env[entry["name"]] = str(places.get(value, value))
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == rendered.one("Secret")["metadata"]["name"]
        if ref["key"] in secret:
            env[entry["name"]] = secret[ref["key"]]
        else:
            assert ref.get("optional") is True, f"{entry['name']}: a required key is missing"
    return env
