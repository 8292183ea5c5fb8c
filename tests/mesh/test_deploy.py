"""The deploy/ examples, validated without Envoy, Istio or a cluster (see deploy/README.md).

- envoy.yaml and the EnvoyFilter's patches: parsed into Envoy's own protos from xds-protos (unknown
  fields and unresolvable `@type`s fail), then checked against the PGV rules Envoy's protos carry.
- Kubernetes core objects: kubernetes-validate, strict (unknown fields fail), against 1.37.
- Istio objects: cloudcoil's pydantic models of Istio's CRDs; a round trip must give back the
  document unchanged, so a misspelt or misplaced key (which pydantic would drop) fails.
- The router config inside the ConfigMap: the router's own config loader.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.istio.networking import v1 as istio_v1
from cloudcoil.models.istio.networking import v1alpha3 as istio_v1alpha3
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from grpc_router.serving.extproc import SERVICE_NAME
from grpc_router.settings import AppConfig, parse_config
from grpc_router.v1 import router_pb2
from tests.mesh.envoy_schema import parse, parse_yaml, rule_violations, typed_configs

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ENVOY_YAML = DEPLOY / "envoy" / "envoy.yaml"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.37.0"
ISTIO_KINDS: dict[tuple[str, str], Any] = {
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): istio_v1alpha3.EnvoyFilter,
    ("networking.istio.io/v1", "VirtualService"): istio_v1.VirtualService,
    ("networking.istio.io/v1", "ServiceEntry"): istio_v1.ServiceEntry,
    ("networking.istio.io/v1", "DestinationRule"): istio_v1.DestinationRule,
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in _documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {K8S}")


def _router_configs() -> dict[str, AppConfig]:
    data = _find("ConfigMap", "grpc-router-config")["data"]
    return {
        key: parse_config(yaml.safe_load(text), K8S / "configmap.yaml" / key)
        for key, text in data.items()
    }


@pytest.fixture(scope="module")
def router_config() -> AppConfig:
    """The sidecar's (CPU int8) config; the one envoy.yaml and the EnvoyFilter pair with."""
    return _router_configs()["config.yaml"]


@pytest.fixture(scope="module")
def bootstrap() -> bootstrap_pb2.Bootstrap:
    return parse_yaml(ENVOY_YAML, bootstrap_pb2.Bootstrap())


def _hcm(
    bootstrap: bootstrap_pb2.Bootstrap, listener: str = "llm_ingress"
) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    [found] = [x for x in bootstrap.static_resources.listeners if x.name == listener]
    assert found.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def _ext_proc(filters: Any) -> ext_proc_pb2.ExternalProcessor:
    config = ext_proc_pb2.ExternalProcessor()
    [ext_proc] = [f for f in filters if f.name == "envoy.filters.http.ext_proc"]
    assert ext_proc.typed_config.Unpack(config)
    return config


# -- envoy.yaml ---------------------------------------------------------------------------------


def test_envoy_yaml_is_a_valid_bootstrap(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    assert rule_violations(bootstrap) == []
    assert set(typed_configs(bootstrap)) >= {
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "envoy.extensions.filters.http.router.v3.Router",
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    }


def test_the_validator_catches_what_envoy_would_reject() -> None:
    good = yaml.safe_load(ENVOY_YAML.read_text())

    unknown = copy.deepcopy(good)
    unknown["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    with pytest.raises(json_format.ParseError, match="conect_timeout"):
        parse(unknown, bootstrap_pb2.Bootstrap())

    hcm = copy.deepcopy(good)
    filters = hcm["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    filters[0]["typed_config"]["http_filters"][0]["typed_config"]["processing_mode"][
        "request_body_mode"
    ] = "BUFERED"
    with pytest.raises(json_format.ParseError, match="BUFERED"):
        parse(hcm, bootstrap_pb2.Bootstrap())

    bad_type = copy.deepcopy(good)
    http_filters = bad_type["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["http_filters"]
    http_filters[0]["typed_config"]["@type"] = "type.googleapis.com/envoy.nope.v3.ExtProc"
    with pytest.raises(json_format.ParseError, match=r"envoy\.nope"):
        parse(bad_type, bootstrap_pb2.Bootstrap())

    rules = copy.deepcopy(good)
    rules["static_resources"]["clusters"][0]["connect_timeout"] = "0s"
    rules["static_resources"]["clusters"][0]["http2_protocol_options"] = {}
    del rules["static_resources"]["clusters"][1]["name"]
    http_filters = rules["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["http_filters"]
    http_filters[0]["typed_config"]["grpc_service"] = {}
    problems = "\n".join(rule_violations(parse(rules, bootstrap_pb2.Bootstrap())))
    assert "clusters[0].connect_timeout: 0.0 must be gt" in problems
    assert "clusters[0].http2_protocol_options: deprecated field" in problems
    assert "clusters[1].name: must be at least 1" in problems
    assert "grpc_service: one of ['envoy_grpc', 'google_grpc'] is required" in problems


def test_envoy_yaml_wires_ext_proc_to_the_router(
    bootstrap: bootstrap_pb2.Bootstrap, router_config: AppConfig
) -> None:
    hcm = _hcm(bootstrap)
    names = [f.name for f in hcm.http_filters]
    assert names.index("envoy.filters.http.ext_proc") < names.index("envoy.filters.http.router")
    assert names[-1] == "envoy.filters.http.router"
    ext_proc = _ext_proc(hcm.http_filters)
    mode = ext_proc.processing_mode
    assert mode.request_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    assert mode.request_header_mode == processing_mode_pb2.ProcessingMode.SEND
    assert ext_proc.allow_mode_override
    # Envoy must wait longer than the router takes to give up, so the router's failure mode
    # (not Envoy's timeout) decides.
    assert ext_proc.message_timeout.ToTimedelta().total_seconds() > (
        router_config.ext_proc.route_timeout_s
    )
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    router_cluster = clusters[ext_proc.grpc_service.envoy_grpc.cluster_name]
    options = http_protocol_options_pb2.HttpProtocolOptions()
    [options_any] = router_cluster.typed_extension_protocol_options.values()
    assert options_any.Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")  # gRPC needs HTTP/2
    assert router_cluster.health_checks[0].HasField("grpc_health_check")
    assert (
        router_cluster.load_assignment.endpoints[0]
        .lb_endpoints[0]
        .endpoint.address.socket_address.port_value
        == router_config.server.port
    )


def test_envoy_routes_pick_clusters_by_the_routers_model_keys(
    bootstrap: bootstrap_pb2.Bootstrap, router_config: AppConfig
) -> None:
    hcm = _hcm(bootstrap)
    clusters = {c.name for c in bootstrap.static_resources.clusters}
    routed: set[str] = set()
    for route in hcm.route_config.virtual_hosts[0].routes:
        assert route.route.cluster in clusters
        for header in route.match.headers:
            assert header.name == router_config.ext_proc.model_header
            routed.add(header.string_match.exact)
    assert routed, "no route matches on the model header"
    assert routed <= set(router_config.models)
    # The last route catches the default model and every pass-through.
    assert not hcm.route_config.virtual_hosts[0].routes[-1].match.headers


def _router_cluster_options(
    bootstrap: bootstrap_pb2.Bootstrap,
) -> tuple[cluster_pb2.Cluster, http_protocol_options_pb2.HttpProtocolOptions]:
    ext_proc = _ext_proc(_hcm(bootstrap).http_filters)
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    cluster = clusters[ext_proc.grpc_service.envoy_grpc.cluster_name]
    options = http_protocol_options_pb2.HttpProtocolOptions()
    [options_any] = cluster.typed_extension_protocol_options.values()
    assert options_any.Unpack(options)
    return cluster, options


def test_envoy_hashes_a_session_onto_one_router_replica(
    bootstrap: bootstrap_pb2.Bootstrap, router_config: AppConfig
) -> None:
    header = router_config.ext_proc.session_header
    assert header == "x-session-id"
    cluster, options = _router_cluster_options(bootstrap)
    assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH

    # gRPC API callers: the route in front of the router cluster hashes on the session header.
    api = _hcm(bootstrap, "router_api")
    assert [f.name for f in api.http_filters] == ["envoy.filters.http.router"]  # no ext_proc
    [host] = api.route_config.virtual_hosts
    [route] = host.routes
    assert route.match.prefix == f"/{ROUTER_SERVICE}/"
    assert route.match.HasField("grpc")
    assert route.route.cluster == cluster.name
    assert [p.header.header_name for p in route.route.hash_policy] == [header]

    # ext_proc streams have no route: the filter copies the header into the stream's metadata
    # and the cluster's own hash_policy hashes it.
    ext_proc = _ext_proc(_hcm(bootstrap).http_filters)
    metadata = {m.key: m.value for m in ext_proc.grpc_service.initial_metadata}
    assert metadata == {header: f"%REQ({header})%"}
    assert [p.header.header_name for p in options.hash_policy] == [header]


def test_envoy_resolves_every_router_replica(
    bootstrap: bootstrap_pb2.Bootstrap, router_config: AppConfig
) -> None:
    cluster, _ = _router_cluster_options(bootstrap)
    # A ClusterIP would be one address: ring hashing needs the pods, from a headless Service.
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    name, namespace, *rest = address.address.split(".")
    assert rest == ["svc", "cluster", "local"]
    service = _find("Service", name)
    assert service["metadata"]["namespace"] == namespace
    assert service["spec"]["clusterIP"] == "None"
    deployment = _find("Deployment", "grpc-router-gpu")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    [port] = service["spec"]["ports"]
    assert port["port"] == address.port_value == router_config.server.port


def test_the_validator_catches_typos_in_the_hashing() -> None:
    good = yaml.safe_load(ENVOY_YAML.read_text())
    bad_policy = copy.deepcopy(good)
    bad_policy["static_resources"]["clusters"][0]["lb_policy"] = "RING_HAS"
    with pytest.raises(json_format.ParseError, match="RING_HAS"):
        parse(bad_policy, bootstrap_pb2.Bootstrap())

    bad_route = copy.deepcopy(good)
    [api] = [x for x in bad_route["static_resources"]["listeners"] if x["name"] == "router_api"]
    route = api["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    route["virtual_hosts"][0]["routes"][0]["route"]["hash_policy"] = [
        {"header": {"header_nme": "x-session-id"}}
    ]
    with pytest.raises(json_format.ParseError, match="header_nme"):
        parse(bad_route, bootstrap_pb2.Bootstrap())


# -- Kubernetes ---------------------------------------------------------------------------------


def test_kubernetes_objects_validate_strictly() -> None:
    checked = []
    for name, doc in _documents():
        if (doc["apiVersion"], doc["kind"]) in ISTIO_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.append(f"{name}:{doc['kind']}")
    assert len(checked) >= 4, checked

    deployment = copy.deepcopy(_find("Deployment", "chat-app"))
    deployment["spec"]["template"]["spec"]["initContainers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_configmap_holds_valid_router_configs_for_both_variants() -> None:
    configs = _router_configs()
    assert set(configs) == {"config.yaml", "config-gpu.yaml"}
    for key, cfg in configs.items():
        assert cfg.ext_proc.enabled, key
        # kubelet's gRPC probes reach the pod IP, not loopback.
        assert cfg.server.host == "0.0.0.0", key
        assert cfg.engine.kind == "arch-router", key
    assert configs["config.yaml"].engine.arch_router.provider == "cpu"
    assert configs["config.yaml"].engine.arch_router.variant == "int8"
    assert configs["config-gpu.yaml"].engine.arch_router.variant == "fp16"
    # Both variants route identically; only the engine differs.
    assert configs["config.yaml"].routes == configs["config-gpu.yaml"].routes
    assert configs["config.yaml"].models == configs["config-gpu.yaml"].models


@pytest.mark.parametrize("name", ["chat-app", "grpc-router-gpu"])
def test_router_containers_have_grpc_probes_and_resources(
    name: str, router_config: AppConfig
) -> None:
    spec = _find("Deployment", name)["spec"]["template"]["spec"]
    [router] = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "grpc-router"
    ]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert router[probe]["grpc"]["port"] == router_config.server.port, probe
    assert router["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    requests = router["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    if name == "grpc-router-gpu":
        assert requests["nvidia.com/gpu"] == "1"
    else:
        assert router["restartPolicy"] == "Always"  # a native sidecar
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "grpc-router-config"
    mount = next(m["mountPath"] for m in router["volumeMounts"] if m["name"] == "config")
    config_arg = router["args"][router["args"].index("--config") + 1]
    assert Path(config_arg).parent == Path(mount)
    assert Path(config_arg).name in _router_configs()


# -- Istio --------------------------------------------------------------------------------------


def _istio_round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    model = ISTIO_KINDS[(doc["apiVersion"], doc["kind"])].model_validate(doc)
    dumped: dict[str, Any] = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return dumped


def test_istio_objects_match_istio_schemas() -> None:
    istio = [(n, d) for n, d in _documents() if (d["apiVersion"], d["kind"]) in ISTIO_KINDS]
    assert {d["kind"] for _, d in istio} >= {"EnvoyFilter", "VirtualService"}
    for name, doc in istio:
        assert _istio_round_trip(doc) == doc, name

    misspelt = copy.deepcopy(_find("EnvoyFilter", "grpc-router-ext-proc"))
    misspelt["spec"]["workloadSelecter"] = misspelt["spec"].pop("workloadSelector")
    assert _istio_round_trip(misspelt) != misspelt
    bad_enum = copy.deepcopy(misspelt)
    bad_enum["spec"]["configPatches"][1]["patch"]["operation"] = "INSERT_BEFOR"
    with pytest.raises(ValueError, match="INSERT_BEFOR"):
        _istio_round_trip(bad_enum)


def test_envoyfilter_patches_are_valid_envoy_config(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    patches = _find("EnvoyFilter", "grpc-router-ext-proc")["spec"]["configPatches"]
    by_target = {p["applyTo"]: p["patch"]["value"] for p in patches}
    cluster = parse(by_target["CLUSTER"], cluster_pb2.Cluster())
    http_filter = parse(by_target["HTTP_FILTER"], hcm_pb2.HttpFilter())
    assert rule_violations(cluster) == []
    assert rule_violations(http_filter) == []
    ext_proc = _ext_proc([http_filter])
    assert ext_proc.grpc_service.envoy_grpc.cluster_name == cluster.name
    # Same processing contract as the plain-Envoy example.
    plain = _ext_proc(_hcm(bootstrap).http_filters)
    assert ext_proc.processing_mode == plain.processing_mode
    assert ext_proc.message_timeout == plain.message_timeout


def test_virtualservice_routes_on_the_routers_model_keys(router_config: AppConfig) -> None:
    service = _find("VirtualService", "llm-by-router")
    keys = set()
    for route in service["spec"]["http"]:
        for match in route.get("match", []):
            for header, rule in match["headers"].items():
                assert header == router_config.ext_proc.model_header
                keys.add(rule["exact"])
    assert keys and keys <= set(router_config.models)
    assert "match" not in service["spec"]["http"][-1]  # the default catches pass-throughs


def test_destination_rule_hashes_the_router_service_by_session(router_config: AppConfig) -> None:
    service = _find("Service", "grpc-router-gpu")
    meta = service["metadata"]
    rule = _find("DestinationRule", "grpc-router-gpu-sessions")
    assert rule["metadata"]["namespace"] == meta["namespace"]
    assert rule["spec"]["host"] == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    hashing = rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]
    assert hashing == {"httpHeaderName": router_config.ext_proc.session_header}
    # Both router configs read the session from the header the mesh hashes on.
    assert {c.ext_proc.session_header for c in _router_configs().values()} == {"x-session-id"}
    # Istio's L7 load balancing needs the port to be known as gRPC (or HTTP/2).
    assert [p["appProtocol"] for p in service["spec"]["ports"]] == ["grpc"]

    assert _istio_round_trip(rule) == rule
    misspelt = copy.deepcopy(rule)
    misspelt["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"] = {
        "httpHeaderNam": "x-session-id"
    }
    assert _istio_round_trip(misspelt) != misspelt
    misplaced = copy.deepcopy(rule)
    balancer = misplaced["spec"]["trafficPolicy"]["loadBalancer"]
    balancer["consistentHsh"] = balancer.pop("consistentHash")
    assert _istio_round_trip(misplaced) != misplaced


# -- Scale-out: the shared CPU router, its HPA, PDB and probes (router-cpu.yaml) ----------------

ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
SCALED = "grpc-router"


def _cpu_router_config(configmap: dict[str, Any]) -> AppConfig:
    [(key, text)] = configmap["data"].items()
    return parse_config(yaml.safe_load(text), K8S / "router-cpu.yaml" / key)


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (the suffixes an averageValue may carry)."""
    text = str(value)
    for suffix, scale in (("m", 1e-3), ("k", 1e3), ("Ki", 1024.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def _router_gauges() -> set[str]:
    from prometheus_client import Gauge

    from grpc_router.observability import metrics

    names = {d.name for m in vars(metrics).values() if isinstance(m, Gauge) for d in m.describe()}
    return {n for n in names if n.startswith("grpc_router_")}


def _scale_out_problems(
    hpa: dict[str, Any],
    pdb: dict[str, Any],
    deployment: dict[str, Any],
    configmap: dict[str, Any],
    adapter: dict[str, Any],
) -> list[str]:
    """What would make the autoscaling or the overload signals silently not work: references
    between the objects, the metric chain (router gauge -> adapter rule -> HPA), the probes'
    health service names, and the order of the thresholds."""
    from grpc_router.serving.server import READINESS_SERVICE

    problems: list[str] = []
    ns = deployment["metadata"]["namespace"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref.get("apiVersion"), ref.get("kind"), ref.get("name")) != (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    ):
        problems.append(f"HPA scaleTargetRef {ref} is not the router Deployment")
    for doc in (hpa, pdb, configmap):
        if doc["metadata"].get("namespace") != ns:
            problems.append(f"{doc['kind']} is not in namespace {ns}")
    spec = hpa["spec"]
    if not 2 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]:
        problems.append("HPA minReplicas must be at least 2 (one may be disrupted) and <= max")
    # The metric chain: every HPA metric is a Pods metric the adapter serves, from a gauge the
    # router exports, averaged per pod.
    rules = adapter["rules"]["custom"]
    served = {r["name"]["as"]: r for r in rules}
    gauges = _router_gauges()
    for rule in rules:
        series = rule["seriesQuery"].split("{", 1)[0]
        if series not in gauges:
            problems.append(f"adapter rule reads {series!r}, which the router does not export")
        overrides = rule["resources"]["overrides"]
        if overrides != {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}:
            problems.append(f"adapter rule {series}: namespace and pod labels must map to objects")
        for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            if part not in rule["metricsQuery"]:
                problems.append(f"adapter rule {series}: metricsQuery lacks {part}")
    config = _cpu_router_config(configmap)
    for metric in spec["metrics"]:
        if metric["type"] != "Pods":
            problems.append(f"HPA metric of type {metric['type']}: a per-pod metric is wanted")
            continue
        name = metric["pods"]["metric"]["name"]
        if name not in served:
            problems.append(f"HPA metric {name!r} is not served by the adapter ({sorted(served)})")
        target = metric["pods"]["target"]
        if target.get("type") != "AverageValue":
            problems.append(f"HPA metric {name}: target type must be AverageValue (per pod)")
            continue
        value = _quantity(target["averageValue"])
        if not 0 < value < config.server.overload_queue_depth:
            problems.append(
                f"HPA target {value} for {name} must be positive and below "
                f"server.overload_queue_depth ({config.server.overload_queue_depth}), so that "
                "replicas are added before readiness takes pods out"
            )
    # The PDB covers exactly the router pods and leaves at least one.
    if pdb["spec"]["selector"].get("matchLabels") != labels:
        problems.append("PDB selector does not match the Deployment's pods")
    if not labels.items() <= pod_labels.items():
        problems.append("Deployment selector does not match its own pod template")
    if "maxUnavailable" in pdb["spec"]:
        if _quantity(pdb["spec"]["maxUnavailable"]) >= spec.get("minReplicas", 1):
            problems.append("PDB maxUnavailable would allow every minReplicas pod to go")
    elif _quantity(pdb["spec"]["minAvailable"]) < 1:
        problems.append("PDB minAvailable must keep a pod")
    # Probes: readiness reflects overload, liveness and startup the process alone.
    pod = deployment["spec"]["template"]["spec"]
    [router] = [c for c in pod["containers"] if c["name"] == "grpc-router"]
    expected = {
        "startupProbe": "",
        "livenessProbe": "",
        "readinessProbe": READINESS_SERVICE,
    }
    for probe, service in expected.items():
        grpc_probe = router.get(probe, {}).get("grpc", {})
        if grpc_probe.get("port") != config.server.port:
            problems.append(f"{probe} does not ask the router's port {config.server.port}")
        if grpc_probe.get("service", "") != service:
            problems.append(f"{probe} asks health service {grpc_probe.get('service')!r}, "
                            f"not {service!r}")  # fmt: skip
    volumes = {v["name"]: v for v in pod["volumes"]}
    if volumes["config"]["configMap"]["name"] != configmap["metadata"]["name"]:
        problems.append("the config volume is not the router's ConfigMap")
    mount = next(m["mountPath"] for m in router["volumeMounts"] if m["name"] == "config")
    config_arg = router["args"][router["args"].index("--config") + 1]
    if config_arg != f"{mount}/{next(iter(configmap['data']))}":
        problems.append(f"--config {config_arg} is not the mounted ConfigMap key")
    return problems


def _scale_out_docs() -> dict[str, Any]:
    return {
        "hpa": _find("HorizontalPodAutoscaler", SCALED),
        "pdb": _find("PodDisruptionBudget", SCALED),
        "deployment": _find("Deployment", SCALED),
        "configmap": _find("ConfigMap", "grpc-router-cpu-config"),
        "adapter": yaml.safe_load(ADAPTER_VALUES.read_text()),
    }


def test_router_scales_out_on_its_queue_depth_with_overload_aware_probes() -> None:
    docs = _scale_out_docs()
    assert _scale_out_problems(**docs) == []
    [metric] = docs["hpa"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "grpc_router_engine_queue_depth"
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        doc = docs["hpa" if kind.startswith("Horizontal") else "pdb"]
        assert doc["kind"] == kind
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("what", "path", "value"),
    [
        ("hpa", ("spec", "scaleTargetRef", "name"), "grpc-routr"),
        ("hpa", ("spec", "metrics", 0, "pods", "metric", "name"), "grpc_router_engine_queue_dept"),
        ("hpa", ("spec", "metrics", 0, "pods", "target", "averageValue"), "64"),
        ("hpa", ("spec", "minReplicas"), 1),
        ("pdb", ("spec", "selector", "matchLabels", "app"), "grpc-routr"),
        ("adapter", ("rules", "custom", 0, "seriesQuery"), 'grpc_router_queue_depth{pod!=""}'),
        ("adapter", ("rules", "custom", 0, "name", "as"), "grpc_router_queue_depth"),
        (
            "deployment",
            ("spec", "template", "spec", "containers", 0, "readinessProbe", "grpc", "service"),
            "grpc_router.readyness",
        ),
        (
            "deployment",
            ("spec", "template", "spec", "containers", 0, "livenessProbe", "grpc", "service"),
            "grpc_router.readiness",
        ),
        (
            "deployment",
            ("spec", "template", "spec", "volumes", 0, "configMap", "name"),
            "grpc-router-config",
        ),
    ],
)
def test_scale_out_checks_catch_a_typo(what: str, path: tuple[str | int, ...], value: Any) -> None:
    docs = copy.deepcopy(_scale_out_docs())
    node = docs[what]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _scale_out_problems(**docs) != []


@pytest.mark.parametrize(
    ("kind", "key", "typo"),
    [
        ("HorizontalPodAutoscaler", "scaleTargetRef", "scaleTargetRf"),
        ("HorizontalPodAutoscaler", "behavior", "behaviour"),
        ("PodDisruptionBudget", "maxUnavailable", "maxUnavailble"),
    ],
)
def test_kubernetes_validation_catches_a_misspelt_scale_out_field(
    kind: str, key: str, typo: str
) -> None:
    doc = copy.deepcopy(_find(kind, SCALED))
    doc["spec"][typo] = doc["spec"].pop(key)
    with pytest.raises(kubernetes_validate.ValidationError, match=typo):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_cpu_router_serves_the_mesh_routes_with_the_encoder() -> None:
    config = _cpu_router_config(_find("ConfigMap", "grpc-router-cpu-config"))
    mesh = _router_configs()["config.yaml"]
    # The mesh's VirtualService and Envoy route on these model keys: the same for every router.
    assert config.routes == mesh.routes
    assert config.models == mesh.models
    assert config.default_route == mesh.default_route
    assert config.engine.kind == "encoder"
    assert config.server.host == "0.0.0.0"
    assert config.ext_proc.enabled
    assert config.ext_proc.session_header == mesh.ext_proc.session_header
    assert config.routing.fail_open  # an overloaded replica answers the default route
    service = _find("Service", SCALED)
    deployment = _find("Deployment", SCALED)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["appProtocol"] for p in service["spec"]["ports"]] == ["grpc"]
    rule = _find("DestinationRule", "grpc-router-sessions")
    meta = service["metadata"]
    assert rule["spec"]["host"] == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"] == {
        "httpHeaderName": config.ext_proc.session_header
    }
