"""The deployment files, checked without Docker or a cluster (neither runs on these machines):
the compose file against the official compose-spec JSON schema (vendored), the Kubernetes
manifests against the Kubernetes API schemas (``kubernetes-validate``, strict: unknown
fields fail), the GPU job template through Prefect's own server validation and Kubernetes
worker code, and the services' references to each other (hosts, ports, databases, bucket,
secrets, labels)."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
JOB_TEMPLATE = K8S / "work-pool" / "gpu-job-template.json"
K8S_VERSIONS = ("1.29.0", "1.33.0")  # a two-year-old cluster and a current one


# --- compose ----------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (``${V}``, ``${V:-default}``, ``${V:?error}``,
    ``$$`` for a literal ``$``), applied to every string of a loaded compose file, as
    ``docker compose config`` does before it validates against the schema."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        set_ = env.get(name, "") != "" if op and op.startswith(":") else name in env
        if op and op.endswith("?") and not set_:
            raise KeyError(f"{name}: {arg}")
        if op and op.endswith("-") and not set_:
            return arg
        return env.get(name, "")

    return _VAR.sub(sub, value)


def example_env() -> dict[str, str]:
    lines = (DEPLOY / "env.example").read_text().splitlines()
    return dict(l.split("=", 1) for l in lines if l.strip() and not l.startswith("#"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), example_env())


@pytest.fixture(scope="module")
def compose_schema():
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_spec_schema(compose, compose_schema):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in compose_schema.iter_errors(compose)]
    assert errors == []


def test_the_schema_check_catches_a_broken_compose_file(compose, compose_schema):
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    broken["services"]["minio"]["helthcheck"] = broken["services"]["minio"].pop("healthcheck")
    messages = [e.message for e in compose_schema.iter_errors(broken)]
    assert any("service_ready" in m for m in messages)
    assert any("helthcheck" in m for m in messages)


def test_every_required_variable_is_in_env_example():
    raw = yaml.safe_load(COMPOSE.read_text())
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert used <= set(example_env()) | {"OMP_NUM_THREADS"}
    for missing in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        env = {k: v for k, v in example_env().items() if k != missing}
        with pytest.raises(KeyError, match=f"{missing}: set {missing} in deploy/.env"):
            interpolate(raw, env)  # a missing secret stops compose with our message


def _command(service: dict) -> list[str]:
    cmd = service.get("command")
    return cmd if isinstance(cmd, list) else cmd.split()


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_compose_services_reference_each_other_consistently(compose):
    services = compose["services"]
    env = example_env()
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} must run once"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"

    # PostgreSQL: MLflow's database is the one the image creates, Prefect's the init script's.
    pg = services["postgres"]["environment"]
    mlflow_cmd = _command(services["mlflow"])
    store = urlsplit(_flag(mlflow_cmd, "--backend-store-uri"))
    assert (store.scheme, store.hostname, store.port) == ("postgresql", "postgres", 5432)
    assert (store.username, store.password) == (pg["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
    assert store.path == f"/{pg['POSTGRES_DB']}"
    prefect_db = urlsplit(services["prefect-server"]["environment"][
        "PREFECT_API_DATABASE_CONNECTION_URL"])
    assert (prefect_db.scheme, prefect_db.hostname, prefect_db.port) == (
        "postgresql+asyncpg", "postgres", 5432)
    assert prefect_db.username == pg["POSTGRES_USER"] and prefect_db.path != store.path
    init_sql = (DEPLOY / "postgres-init.sql").read_text()
    assert f"CREATE DATABASE {prefect_db.path[1:]} OWNER {pg['POSTGRES_USER']};" in init_sql
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres-init.sql:/docker-entrypoint-initdb.d/") for m in mounts)

    # MinIO: the bucket minio-init creates is the one MLflow proxies artifacts to; every S3
    # client points at MinIO's API port with MinIO's root credentials.
    init = services["minio-init"]
    bucket = init["environment"]["BUCKET"]
    assert 'mc mb --ignore-existing "local/$BUCKET"' in init["entrypoint"][-1]
    assert "mc alias set local http://minio:9000" in init["entrypoint"][-1]
    artifacts = urlsplit(_flag(mlflow_cmd, "--artifacts-destination"))
    assert (artifacts.scheme, artifacts.netloc) == ("s3", bucket)
    minio = services["minio"]["environment"]
    for name in ("mlflow", "prefect-worker"):
        s3 = services[name]["environment"]
        for key in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
            assert s3[key] == "http://minio:9000", (name, key)
        assert s3["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert s3["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]

    # The worker reaches MLflow and Prefect by service name, on the ports they listen on,
    # and MLflow accepts that Host header.
    worker = services["prefect-worker"]
    tracking = urlsplit(worker["environment"]["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow" and str(tracking.port) == _flag(mlflow_cmd, "--port")
    assert tracking.netloc in _flag(mlflow_cmd, "--allowed-hosts").split(",")
    assert services["mlflow"]["ports"] == [f"127.0.0.1:5000:{tracking.port}"]
    api = urlsplit(worker["environment"]["PREFECT_API_URL"])
    prefect_cmd = _command(services["prefect-server"])
    assert (api.hostname, str(api.port), api.path) == (
        "prefect-server", _flag(prefect_cmd, "--port"), "/api")
    assert services["prefect-server"]["ports"] == [f"127.0.0.1:4200:{api.port}"]

    # The worker serves the work pool that deploy/prefect.yaml's deployments name.
    worker_cmd = _command(worker)
    assert _flag(worker_cmd, "--type") == "process"
    prefect_yaml = DEPLOY / "prefect.yaml"
    if prefect_yaml.exists():
        pools = {d["work_pool"]["name"] for d in
                 yaml.safe_load(prefect_yaml.read_text())["deployments"]}
        assert pools == {_flag(worker_cmd, "--pool")}

    # Both pipeline services are built from deploy/Dockerfile, from the repository root.
    for name in ("mlflow", "prefect-worker"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile")


def test_dockerfile_copies_what_exists_and_installs_the_kubernetes_worker():
    text = (DEPLOY / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+)", text, flags=re.M)
    assert copied and all((REPO / c).exists() for c in copied), copied
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '".[kubernetes]"' in text and "\nkubernetes = [" in pyproject
    # Every package the project installs is in the image.
    packages = re.search(r'include = \[(.*?)\]', pyproject, flags=re.S).group(1)
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert pkg in copied, pkg


# --- Kubernetes ---------------------------------------------------------------------------

def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version):
    docs = k8s_docs()
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ConfigMap", "Deployment", "Service",
                                            "ServiceAccount", "Role", "RoleBinding"}
    for name, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises naming the field


def test_the_kubernetes_check_catches_a_broken_manifest():
    name, deployment = next((n, d) for n, d in k8s_docs() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of resources
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


def _containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_kubernetes_objects_reference_each_other_consistently():
    docs = k8s_docs()
    (namespace,) = _by_kind("Namespace")
    assert all(d["metadata"].get("namespace") == namespace for _, d in docs
               if d["kind"] != "Namespace")
    assert not _by_kind("Secret"), "secrets are created by hand, never committed"
    config_maps = _by_kind("ConfigMap")
    secrets_used = set()
    deployments = _by_kind("Deployment")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for c in _containers(dep):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = ref["configMapKeyRef"]
                    assert cm["key"] in config_maps[cm["name"]]["data"], (name, e["name"])
                if "secretKeyRef" in ref:
                    secrets_used.add(ref["secretKeyRef"]["name"])
            secrets_used |= {s["secretRef"]["name"] for s in c.get("envFrom", [])}
            # $(VAR) in args must name an env var of the container, or Kubernetes passes it
            # through literally.
            names = {e["name"] for e in c.get("env", [])}
            for arg in c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in names, (name, c["name"], var)
        account = pod["spec"].get("serviceAccountName")
        if account:
            assert account in _by_kind("ServiceAccount")
    assert secrets_used == {"rlhf-mlflow", "rlhf-s3"}

    # The Service selects the MLflow pods and targets the port the container names.
    service = _by_kind("Service")["mlflow"]
    mlflow = deployments["mlflow"]
    assert service["spec"]["selector"].items() <= mlflow["spec"]["template"]["metadata"][
        "labels"].items()
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in ports
    assert str(ports[svc_port["targetPort"]]) == _flag(container["args"], "--port")
    allowed = _flag(container["args"], "--allowed-hosts").split(",")
    dns = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert f"{dns}:{svc_port['port']}" in allowed

    # The worker's role is bound to its service account; the init container loads the job
    # template from where the image puts it.
    binding = _by_kind("RoleBinding")["prefect-worker"]
    assert binding["roleRef"]["name"] in _by_kind("Role")
    assert {(s["kind"], s["name"]) for s in binding["subjects"]} == {
        ("ServiceAccount", deployments["prefect-worker"]["spec"]["template"]["spec"][
            "serviceAccountName"])}
    init = deployments["prefect-worker"]["spec"]["template"]["spec"]["initContainers"][0]
    path = _flag(init["args"], "--base-job-template")
    assert path == "/app/" + str(JOB_TEMPLATE.relative_to(REPO))  # WORKDIR /app, COPY deploy

    # The flow-run jobs: same namespace, MLflow by its service DNS name, the S3 secret the
    # MLflow server also reads.
    props = json.loads(JOB_TEMPLATE.read_text())["variables"]["properties"]
    assert props["namespace"]["default"] == namespace
    tracking = urlsplit(props["env"]["default"]["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, tracking.port) == (dns, svc_port["port"])
    assert props["s3_secret"]["default"] in secrets_used


def _job_manifest(values: dict) -> dict:
    """The Job Prefect's Kubernetes worker would submit for a flow run, from the template."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from prefect.settings import PREFECT_API_URL, temporary_settings

    template = json.loads(JOB_TEMPLATE.read_text())
    # What the Prefect server checks on `prefect work-pool create --base-job-template`.
    WorkPoolCreate(name="rlhf-gpu", type="kubernetes", base_job_template=template)
    # The worker's API URL (from the ConfigMap) goes into the job's environment; set, it
    # also keeps Prefect from starting a temporary server here (nothing is called on it).
    api = _by_kind("ConfigMap")["rlhf-config"]["data"]["prefect-api-url"]
    with temporary_settings({PREFECT_API_URL: api}):
        config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
            template, values))
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly-run"))
    return config.job_manifest


@pytest.mark.parametrize("gpus", [None, 2])
def test_gpu_job_template_renders_a_valid_job_with_a_gpu_request(gpus):
    values = {"image": "registry.example/rlhf-pipeline:1"} | ({"gpu_count": gpus} if gpus else {})
    job = _job_manifest(values)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    want = gpus or 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == want
    assert container["resources"]["requests"]["nvidia.com/gpu"] == want
    assert container["image"] == values["image"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert {"nvidia.com/gpu"} == {t["key"] for t in pod["tolerations"]}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/app/runs", "/dev/shm"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    assert env["PREFECT_API_URL"] == _by_kind("ConfigMap")["rlhf-config"]["data"][
        "prefect-api-url"]
    assert "PREFECT__FLOW_RUN_ID" in env  # filled in by the worker for this flow run
