"""The deployment cannot drift from the service: every manifest in deploy/k8s is checked field by field
against the Kubernetes client's typed models (strictly: the models themselves drop unknown keys), the
ServiceMonitor by hand, the container's arguments against the service's own command line, and the
Dockerfile for its stages, user, health check and entrypoint. Offline and fast: no cluster, no docker."""

from __future__ import annotations

import copy
import difflib
import functools
import json
import re
from pathlib import Path

import pytest
import yaml

from bench.serve.__main__ import serve_parser

kubernetes = pytest.importorskip("kubernetes", reason="the test extra 'kubernetes' is not installed")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
NAME = "archbench-serve"

# -- the manifests -----------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml")


@functools.cache
def parsed() -> tuple[tuple[Path, dict], ...]:
    return tuple((path, doc) for path in manifest_files() for doc in yaml.safe_load_all(path.read_text())
                 if doc is not None)


def documents() -> list[tuple[Path, dict]]:
    """Every YAML document of every manifest, with its file (a copy: a test may change it)."""
    return copy.deepcopy(list(parsed()))


def one(kind: str) -> dict:
    found = [doc for _, doc in documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def container() -> dict:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_labels() -> dict:
    return one("Deployment")["spec"]["template"]["metadata"]["labels"]


def container_port(port: int | str) -> int:
    """A probe's or Service's port (a number or the container port's name) as the container's port number."""
    ports = container()["ports"]
    for p in ports:
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    raise AssertionError(f"port {port!r} is not one of the container's ports {ports}")


# -- strict typed-model check ------------------------------------------------------------------------------

CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
LIST = re.compile(r"^(?:List\[|list\[)(.*)\]$")
DICT = re.compile(r"^(?:Dict\[|dict\()[^,]*, (.*)[\])]$")
OPTIONAL = re.compile(r"^Optional\[(.*)\]$")
# YAML scalars each primitive accepts ("str" also numbers: quantities such as cpu: 2 are valid)
PRIMITIVES = {"str": (str, int, float), "int": (int,), "float": (int, float), "bool": (bool,),
              "datetime": (str,), "date": (str,)}


def model_name(api_version: str, kind: str) -> str:
    """The client's class for a kind: apps/v1 Deployment → V1Deployment, autoscaling/v2 … → V2…."""
    version = api_version.rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + kind


def field_problems(value, klass: str, where: str = "") -> list[str]:
    """Every key of `value` that is not a field of the typed model `klass` at that level (and every
    value of the wrong shape), recursing through the model's openapi_types: lists, maps and models."""
    if value is None:
        return []
    if m := OPTIONAL.match(klass):
        return field_problems(value, m.group(1), where)
    if m := LIST.match(klass):
        if not isinstance(value, list):
            return [f"{where or '.'}: expected a list ({klass}), got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in field_problems(item, m.group(1), f"{where}[{i}]")]
    if m := DICT.match(klass):
        if not isinstance(value, dict):
            return [f"{where or '.'}: expected a map ({klass}), got {type(value).__name__}"]
        return [p for k, v in value.items() for p in field_problems(v, m.group(1), f"{where}.{k}")]
    if klass == "object":  # IntOrString, raw extensions
        return []
    if klass in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[klass]) and not (klass != "bool" and isinstance(value, bool))
        return [] if ok else [f"{where}: expected {klass}, got {type(value).__name__} {value!r}"]
    model = getattr(kubernetes.client.models, klass, None)
    if model is None:
        return [f"{where or '.'}: no model {klass} in the kubernetes client"]
    if not isinstance(value, dict):
        return [f"{where or '.'}: expected a {klass} (a map), got {type(value).__name__}"]
    attributes = {key: attr for attr, key in model.attribute_map.items()}
    problems = []
    for key, sub in value.items():
        if key not in attributes:
            close = difflib.get_close_matches(key, attributes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}.{key}: not a field of {klass}{hint}")
        else:
            problems += field_problems(sub, model.openapi_types[attributes[key]], f"{where}.{key}")
    return problems


def typed(doc: dict):
    """The document as the client's typed model, after the strict check (which the models cannot do)."""
    name = model_name(doc["apiVersion"], doc["kind"])
    problems = field_problems(doc, name)
    assert problems == [], f"{doc['kind']} {doc['metadata']['name']}: " + "; ".join(problems)
    obj = kubernetes.client.ApiClient()._ApiClient__deserialize(doc, name)
    assert type(obj).__name__ == name and obj.kind == doc["kind"] and obj.api_version == doc["apiVersion"]
    return obj


def test_every_built_in_manifest_deserialises_into_the_clients_typed_models_with_no_unknown_field():
    docs = documents()
    assert {doc["kind"] for _, doc in docs} == {"Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget",
                                               "HorizontalPodAutoscaler"}
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name") == NAME, path.name
        if (doc["apiVersion"], doc["kind"]) not in CRDS:
            typed(doc)
    deployment = typed(one("Deployment"))
    assert deployment.spec.template.spec.containers[0].readiness_probe.http_get.path == "/v1/models"


def test_the_strict_check_catches_a_misspelt_field_the_models_silently_drop():
    doc = copy.deepcopy(one("Deployment"))
    c = doc["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    # the generated models alone accept it, and lose the probe
    obj = kubernetes.client.ApiClient()._ApiClient__deserialize(doc, "V1Deployment")
    assert obj.spec.template.spec.containers[0].readiness_probe is None
    assert field_problems(doc, "V1Deployment") == [
        ".spec.template.spec.containers[0].readinesProbe: not a field of V1Container (did you mean 'readinessProbe'?)"]
    # deeper, inside a list of maps, and a value of the wrong type
    doc = copy.deepcopy(one("Deployment"))
    pod = doc["spec"]["template"]["spec"]
    pod["volumes"][0]["persistentVolumeClaim"]["claimNmae"] = "x"
    pod["containers"][0]["volumeMounts"][0]["readOnly"] = "yes"
    pod["containers"][0]["resources"]["limits"]["cpu"] = ["2"]
    assert field_problems(doc, "V1Deployment") == [
        ".spec.template.spec.containers[0].resources.limits.cpu: expected str, got list ['2']",
        ".spec.template.spec.containers[0].volumeMounts[0].readOnly: expected bool, got str 'yes'",
        (".spec.template.spec.volumes[0].persistentVolumeClaim.claimNmae: not a field of "
         "V1PersistentVolumeClaimVolumeSource (did you mean 'claimName'?)")]
    hpa = copy.deepcopy(one("HorizontalPodAutoscaler"))
    hpa["spec"]["scaleTargetRef"]["knd"] = "Deployment"
    assert field_problems(hpa, "V2HorizontalPodAutoscaler") == [
        ".spec.scaleTargetRef.knd: not a field of V2CrossVersionObjectReference (did you mean 'kind'?)"]


# -- the kustomization ---------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "images", "namespace", "namePrefix", "nameSuffix",
                        "labels", "commonLabels", "commonAnnotations", "patches", "configMapGenerator",
                        "secretGenerator", "generatorOptions", "replicas", "components", "replacements"}


def test_the_kustomization_lists_every_manifest_and_rewrites_the_containers_image():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= KUSTOMIZATION_FIELDS, set(kustomization) - KUSTOMIZATION_FIELDS
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == [p.name for p in manifest_files()]
    # the images entry applies only where a container's image has its name
    assert [image["name"] for image in kustomization["images"]] == [container()["image"].split(":")[0]]


# -- names, labels, ports, probes ------------------------------------------------------------------------------


def test_every_object_carries_the_apps_label_and_every_selector_picks_the_pods():
    for path, doc in documents():
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == NAME, path.name
    pods = pod_labels()
    selectors = {"Deployment": one("Deployment")["spec"]["selector"]["matchLabels"],
                 "Service": one("Service")["spec"]["selector"],
                 "PodDisruptionBudget": one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]}
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pods.items(), kind


def test_the_probes_service_and_scrape_annotations_use_the_containers_port():
    c = container()
    port = container_port("http")
    assert port == 8000
    probes = {name: c[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/v1/models"}
    assert all(container_port(probe["port"]) == port for probe in probes.values())
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300  # minutes to load a model
    for name in probes:
        assert c[name]["timeoutSeconds"] < c[name]["periodSeconds"], name
    (service_port,) = one("Service")["spec"]["ports"]
    assert container_port(service_port["targetPort"]) == port
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"


SERVICE_MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                        "sampleLimit", "attachMetadata"}
SERVICE_MONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
                            "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "tlsConfig",
                            "authorization", "followRedirects", "enableHttp2", "filterRunning"}


def test_the_service_monitor_scrapes_metrics_from_the_services_named_port():
    monitor, service = one("ServiceMonitor"), one("Service")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC, set(spec) - SERVICE_MONITOR_SPEC
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p.get("name") for p in service["spec"]["ports"]}
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT, set(endpoint) - SERVICE_MONITOR_ENDPOINT
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        for duration in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint.get(duration, "30s")), duration


def test_the_pdb_and_hpa_point_at_the_deployment():
    pdb, hpa = one("PodDisruptionBudget"), one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and pdb["apiVersion"] == "policy/v1"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    assert "replicas" not in one("Deployment")["spec"]  # the HPA owns the count
    # a drain can always evict a pod: the budget keeps fewer than the HPA's least
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # the better signal is documented under the name the service exports
    assert "archbench_queue_depth" in (K8S / "hpa.yaml").read_text()
    assert '"archbench_queue_depth"' in (ROOT / "bench" / "serve" / "metrics.py").read_text()


# -- the pod: security, volumes, resources, arguments -------------------------------------------------------


def test_the_pod_runs_as_the_dockerfiles_non_root_user_with_a_read_only_root():
    pod = one("Deployment")["spec"]["template"]["spec"]
    c = container()
    security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}  # the container's wins
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0 and security["runAsUser"] == dockerfile_uid()
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert "ALL" in security["capabilities"]["drop"]
    # with a read-only root, /tmp and $HOME (caches, a BPE run's fitted tokenizer) are emptyDirs
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for path in ("/tmp", env["HOME"]):
        assert mounts.get(path) in empty, path
    for name in ("XDG_CACHE_HOME", "ARCHBENCH_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
        assert any(env[name].startswith(path + "/") for path, volume in mounts.items() if volume in empty), name


def run_mount() -> tuple[dict, dict]:
    """The volume mount and volume holding the served run folder (the last positional argument)."""
    run_dir = serve_args().run_dir
    c, pod = container(), one("Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in c["volumeMounts"] if run_dir.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_the_run_is_mounted_read_only_from_a_claim():
    mount, volume = run_mount()
    assert mount["readOnly"] is True
    assert volume["persistentVolumeClaim"]["readOnly"] is True and volume["persistentVolumeClaim"]["claimName"]


QUANTITY = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
            "Ti": 2**40}


def quantity(value) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert m and m.group(2) in QUANTITY, f"not a quantity: {value!r}"
    return float(m.group(1)) * QUANTITY[m.group(2)]


def test_the_container_has_cpu_and_memory_requests_within_its_limits():
    resources = container()["resources"]
    for resource in ("cpu", "memory"):
        assert 0 < quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource]), resource
    assert quantity("500m") == 0.5 and quantity("2Gi") == 2 * 2**30


def entrypoint() -> list[str]:
    (line,) = [args for keyword, args in instructions()[-1] if keyword == "ENTRYPOINT"]
    return json.loads(line)


def serve_argv() -> list[str]:
    """The service's arguments in the pod: the image's ENTRYPOINT after `-m bench.serve`, or the
    container's command if it sets one, then the container's args."""
    c = container()
    command = c.get("command") or entrypoint()
    assert command[:3] == ["python", "-m", "bench.serve"], command
    return [str(a) for a in command[3:] + c.get("args", [])]


def serve_args(argv: list[str] | None = None):
    """The arguments as the service's own parser reads them (a flag it does not know fails the parse)."""
    return serve_parser().parse_args(serve_argv() if argv is None else argv)


def test_the_container_runs_the_services_command_line_on_all_interfaces():
    args = serve_args()
    assert args.host == "0.0.0.0" and args.port == container_port("http")
    assert args.run_dir.startswith(run_mount()[0]["mountPath"])
    assert "--max-queue" in container()["args"] and args.max_queue >= 1  # load is shed, not queued without bound
    # a flag the service does not know fails the parse
    with pytest.raises(SystemExit):
        serve_args(serve_argv() + ["--max-batchh", "4"])


# -- the Dockerfile ---------------------------------------------------------------------------------------


def instructions() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, rest), per stage (a stage starts at FROM)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages[1:]  # stage 0: ARGs before the first FROM


def dockerfile_uid() -> int:
    users = [args for keyword, args in instructions()[-1] if keyword == "USER"]
    assert users, "the runtime stage sets no USER: it runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: use a numeric UID, which Kubernetes' runAsNonRoot can verify"
    return int(uid)


def test_the_dockerfile_builds_in_stages_and_runs_the_service_as_a_non_root_user():
    stages = instructions()
    assert len(stages) >= 2
    runtime = stages[-1]
    assert any(k == "COPY" and args.startswith("--from=") for k, args in runtime)  # the venv, from the builder
    assert not any(k == "RUN" and "pip install" in args for k, args in runtime)  # no build in the runtime
    assert dockerfile_uid() != 0
    assert ("EXPOSE", "8000") in runtime
    (healthcheck,) = [args for k, args in runtime if k == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    command = entrypoint()
    assert command[:3] == ["python", "-m", "bench.serve"]
    args = serve_parser().parse_args(command[3:] + ["results/study/runs/run"])
    assert args.host == "0.0.0.0" and args.port == 8000


def test_the_build_context_keeps_what_the_image_copies_and_leaves_out_results():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"results", ".git", ".venv"} <= ignored
    copied = [src for stage in instructions() for k, args in stage if k == "COPY" and not args.startswith("--from")
              for src in args.split()[:-1]]
    assert copied
    for src in copied:
        assert (ROOT / src).exists() and src.rstrip("/") not in ignored, src
