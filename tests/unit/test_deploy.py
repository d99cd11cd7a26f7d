"""docker-compose.yml, docker/ and deploy/, checked statically (no Docker engine, no cluster): the compose
file against the Compose specification's schema, the rendered Kustomize overlays against Kubernetes' and
Strimzi's schemas (tests/unit/schemas/README.md), pinned images, probes, GPUs, and that every setting a
service reads with a default meant for one machine is set for it in both.

Kustomize is rendered by a small renderer of the features deploy/ uses; where kubectl is installed, a test
checks that it renders exactly what `kubectl kustomize` does."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from alignloop.config import Settings
from alignloop.grpc_health import LIVENESS
from alignloop.kafka_admin import TOPICS

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).with_name("schemas")
K8S_SCHEMAS = SCHEMAS / "kubernetes-v1.33.0"
STRIMZI_SCHEMAS = SCHEMAS / "strimzi-1.2.0"
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# Compose variables without a default: the passwords, which the operator's environment must supply.
REQUIRED_COMPOSE_VARIABLES = {"STORE_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "MINIO_ROOT_PASSWORD"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$|CREDENTIAL", re.IGNORECASE)


# ---- the services and what they read -----------------------------------------------------------------------

# name: (folders scanned for `settings.X`, compose service, Kubernetes Deployment, its own address field).
# A service's own address is where clients reach it; it must not be set for the service itself (the
# collector and the runner bind their own address).
SERVICES = {
    "gateway": (["services/gateway"], "gateway", "alignloop-gateway", None),
    "collector": (["services/feedback"], "feedback", "alignloop-feedback", "feedback_address"),
    "materializer": (["services/feedback"], "materializer", "alignloop-materializer", "feedback_address"),
    "reward": (["services/reward"], "reward", "alignloop-reward", "reward_address"),
    "policy": (["services/policy"], "policy", "alignloop-policy", "policy_address"),
    "policy-canary": (["services/policy"], "policy-canary", "alignloop-policy-canary", "policy_address"),
    # The runner also runs the pipelines' commands in its own container (LocalLauncher).
    "pipeline": (["services/pipeline", "pipelines"], "pipeline", "alignloop-pipeline",
                 "pipeline_address"),
}
# Client address → the port setting of the service it reaches (the canary: the policy service, its own port).
ADDRESS_PORTS = {"policy_address": "policy_port", "policy_canary_address": "policy_port",
                 "feedback_address": "feedback_port", "reward_address": "reward_port",
                 "pipeline_address": "pipeline_port"}
# Settings properties → the field behind them whose default points at this machine.
LOCAL_DEFAULTS = {
    "host": "host", "home": "home", "models_dir": "home", "cache_dir": "home", "logs_dir": "home",
    "run_dir": "home", "credentials_path": "home", "ensure_dirs": "home",
    "kafka_bootstrap": "kafka_bootstrap_servers", "tracking_uri": "mlflow_tracking_uri", "store": "store_url",
    "policy_target": "policy_address", "policy_canary_target": "policy_canary_address",
    "feedback_target": "feedback_address", "reward_target": "reward_address",
    "pipeline_target": "pipeline_address",
}


def settings_read(folders: list[str]) -> set[str]:
    """The Settings attributes the code under `folders` reads (`settings.X`)."""
    names: set[str] = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            names |= set(re.findall(r"\bsettings\.([a-z_]+)", path.read_text()))
    return names


def required_fields(service: str) -> set[str]:
    folders, _, _, own = SERVICES[service]
    read = settings_read(folders)
    unknown = {n for n in read if not hasattr(Settings, n) and n not in Settings.model_fields}
    assert not unknown, f"{service} reads settings that do not exist: {unknown}"
    # Every container gets a home and the bind address: the image's package folder is no place for state.
    needed = {LOCAL_DEFAULTS[n] for n in read if n in LOCAL_DEFAULTS} | {"home", "host"}
    return needed - {own}


def check_env(service: str, env: dict[str, str | None], where: str) -> None:
    """`env`: the variables a container gets (None: from a Secret or a field reference)."""
    own = SERVICES[service][3]
    required = required_fields(service)
    for field in required:
        assert f"ALIGNLOOP_{field.upper()}" in env, f"{where}: ALIGNLOOP_{field.upper()} is not set"
    assert env["ALIGNLOOP_HOST"] == "0.0.0.0", f"{where}: services bind 0.0.0.0 in a container"
    if own:
        assert f"ALIGNLOOP_{own.upper()}" not in env, f"{where}: its own address would be its bind address"
    if "store_url" in required:
        url = env["ALIGNLOOP_STORE_URL"]
        assert url.startswith("postgresql+psycopg://") and ":" not in url.split("//")[1].split("@")[0], \
            f"{where}: the store URL holds no password (PGPASSWORD does)"
        assert "PGPASSWORD" in env, f"{where}: the store's password is not set"
    check_settings_parse(env, where)


def check_settings_parse(env: dict[str, str | None], where: str) -> None:
    """Every ALIGNLOOP_* variable is a setting, and the values make valid Settings."""
    values = {}
    for name, value in env.items():
        if not name.startswith("ALIGNLOOP_"):
            continue
        field = name.removeprefix("ALIGNLOOP_").lower()
        assert field in Settings.model_fields, f"{where}: {name} is no setting (alignloop/config.py)"
        if value is not None:
            values[field] = value
    settings = Settings(**values)
    if settings.pipeline_defaults:
        assert isinstance(json.loads(settings.pipeline_defaults), dict), where


# ---- compose -----------------------------------------------------------------------------------------------

VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def compose_raw() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def interpolate(value):
    """Compose's interpolation with every variable unset: defaults apply, required ones get a placeholder."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        expr = match.group("braced")
        if expr is None:
            raise AssertionError(f"${match.group('bare')}: use ${{NAME:-default}} or ${{NAME:?message}}")
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", expr, re.DOTALL)
        assert m, f"cannot read ${{{expr}}}"
        name, op, rest = m.groups()
        if op in (":-", "-"):
            return rest
        assert op in (":?", "?"), f"${{{name}}} has neither a default nor an error message"
        return f"<{name}>"

    out, pos = [], 0
    for match in re.finditer(r"\$\$|" + VARIABLE.pattern, value):
        out.append(value[pos:match.start()])
        out.append("$" if match.group(0) == "$$" else one(match))
        pos = match.end()
    return "".join(out) + value[pos:]


def compose_variables() -> dict[str, str | None]:
    """Each ${NAME...} in the file: its default, or None when the environment must supply it."""
    found: dict[str, str | None] = {}
    for match in VARIABLE.finditer((REPO / "docker-compose.yml").read_text().replace("$$", "")):
        expr = match.group("braced") or match.group("bare")
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", expr, re.DOTALL)
        name, op, rest = m.groups()
        found[name] = rest if op in (":-", "-") else None
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(compose_raw())


def test_compose_validates_against_the_compose_specification():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for doc in (compose_raw(), interpolate(compose_raw())):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors


def test_compose_variables_have_defaults_except_the_passwords():
    variables = compose_variables()
    required = {name for name, default in variables.items() if default is None}
    assert required == REQUIRED_COMPOSE_VARIABLES
    assert variables["ALIGNLOOP_VERSION"] == VERSION


def test_compose_images_are_pinned_and_built_from_the_repository(compose):
    built = {s["image"] for s in compose["services"].values() if s.get("build")}
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"{name}: no image"
        assert_pinned(image, name)
        if image.startswith("alignloop/"):
            assert image.endswith(f":{VERSION}"), f"{name}: our images carry the project's version"
        build = service.get("build")
        if build:
            dockerfile = REPO / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
            if "target" in build:
                assert f" AS {build['target']}\n" in dockerfile.read_text(), f"{name}: no {build['target']}"
            for context in (build.get("additional_contexts") or {}).values():
                if context.startswith("service:"):
                    assert context.removeprefix("service:") in compose["services"], f"{name}: {context}"
        elif image.startswith("alignloop/"):
            assert image in built, f"{name}: {image} is built by no service"


def probe_names() -> set[str]:
    """The checks docker/probe.py knows."""
    text = (REPO / "docker" / "probe.py").read_text()
    return set(re.findall(r'^\s+"([a-z-]+)": lambda', text, re.MULTILINE))


def test_compose_health_checks_and_dependencies(compose):
    services = compose["services"]
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        if not one_shot:
            assert "healthcheck" in service, f"{name}: a long-running service needs a health check"
            test = service["healthcheck"]["test"]
            if "alignloop-probe" in test:
                assert test[test.index("alignloop-probe") + 1] in probe_names(), f"{name}: {test}"
        for dep, how in (service.get("depends_on") or {}).items():
            condition = how["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for the health of {dep}: it has none"
            else:
                assert condition == "service_completed_successfully", f"{name} → {dep}: wait on health"
                assert services[dep].get("restart") == "no", f"{dep} is not a one-shot service"
    gateway_waits_for = set(services["gateway"]["depends_on"])
    assert gateway_waits_for >= {"policy", "feedback", "reward", "pipeline", "kafka-init"}


def test_compose_state_lives_in_named_volumes(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {source}"
            used.add(source)
    assert used == declared


def test_compose_gpus_and_scaling(compose):
    services = compose["services"]
    for name in ("policy", "policy-canary", "pipeline", "ppo-worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    # Started on demand: the canary holds a GPU, the PPO worker runs by hand.
    assert services["policy-canary"]["deploy"]["replicas"] == 0
    assert services["ppo-worker"]["deploy"]["replicas"] == 0
    # The collector scales with --scale: no fixed container name or host port.
    assert "container_name" not in services["feedback"] and "ports" not in services["feedback"]
    canary_env = services["policy-canary"]["environment"]
    assert canary_env["ALIGNLOOP_POLICY_MODEL_ALIAS"] == "challenger"
    assert str(canary_env["ALIGNLOOP_POLICY_WAIT_FOR_ALIAS"]).lower() == "true"
    assert services["gateway"]["environment"]["ALIGNLOOP_POLICY_CANARY_ADDRESS"] == \
        f"policy-canary:{canary_env['ALIGNLOOP_POLICY_PORT']}"


def compose_env(service: dict) -> dict[str, str | None]:
    return {k: None if v is None else str(v) for k, v in (service.get("environment") or {}).items()}


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_what_each_service_reads(compose, service):
    _, name, _, _ = SERVICES[service]
    check_env(service, compose_env(compose["services"][name]), f"docker-compose.yml {name}")


def listen_port(env: dict[str, str | None], port_field: str) -> int:
    return int(env.get(f"ALIGNLOOP_{port_field.upper()}") or Settings.model_fields[port_field].default)


def test_compose_addresses_reach_the_services(compose):
    services = compose["services"]
    targets = {"policy_address": "policy", "policy_canary_address": "policy-canary",
               "feedback_address": "feedback", "reward_address": "reward", "pipeline_address": "pipeline"}
    for name, service in services.items():
        for field, target in targets.items():
            value = compose_env(service).get(f"ALIGNLOOP_{field.upper()}")
            if value is None:
                continue
            served = compose_env(services[target])
            port = listen_port(served, ADDRESS_PORTS[field])
            assert value == f"{target}:{port}", f"{name}: {field}={value}"
            assert served["ALIGNLOOP_HOST"] == "0.0.0.0"


def test_compose_has_no_secret_values(compose):
    raw = compose_raw()
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert isinstance(value, str) and VARIABLE.fullmatch(value), \
                    f"{name}: {key} must come from the environment, not the file"
    assert raw["secrets"]["credentials"]["file"].startswith("${ALIGNLOOP_CREDENTIALS_FILE:-")
    gateway = raw["services"]["gateway"]
    assert gateway["secrets"][0]["target"] == f"{gateway['environment']['ALIGNLOOP_HOME']}/credentials.json"


def test_compose_topics_are_alignloops(compose):
    script = compose["services"]["kafka-init"]["command"][-1]
    assert set(re.search(r"for topic in ([^;]+);", script).group(1).split()) == set(TOPICS)
    assert compose["services"]["kafka"]["image"].split(":")[1] == strimzi_kafka_version()


# ---- Dockerfiles -------------------------------------------------------------------------------------------

def dockerfiles() -> list[Path]:
    return sorted((REPO / "docker").glob("*.Dockerfile"))


def from_images(text: str) -> list[tuple[str, str | None]]:
    """(image, stage name) of each FROM, ARG defaults substituted; earlier stage names stay names."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    out = []
    for image, stage in re.findall(r"^FROM (?:--platform=\S+ )?(\S+)(?: AS (\S+))?", text, re.MULTILINE):
        out.append((re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image), stage or None))
    return out


def assert_pinned(image: str, where: str) -> None:
    if "@sha256:" in image:
        return
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("latest", ""), f"{where}: {image} is not pinned to a tag"


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_dockerfiles_pin_their_bases_and_run_as_a_user(path):
    text = path.read_text()
    names: set[str] = set()
    for image, stage in from_images(text):
        if image not in names:
            assert_pinned(image, path.name)
        if stage:
            names.add(stage)
    # The final stage, and the base's two targets, drop root.
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    runtime = [stages[-1]] + [st for st in stages if re.match(r"\S+ AS (cpu|cuda)\n", st)]
    for stage in runtime:
        users = re.findall(r"^USER (\S+)", stage, re.MULTILINE)
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: runs as root"


def test_service_images_share_the_base():
    base = (REPO / "docker" / "base.Dockerfile").read_text()
    assert len(from_images(base)) >= 4, "base.Dockerfile builds in stages"
    cuda = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v(\S+)", base, re.MULTILINE).group(1)
    assert f"vllm=={cuda}\n" in (REPO / "requirements" / "cuda.txt").read_text()
    for path in dockerfiles():
        if path.name in ("base.Dockerfile", "mlflow.Dockerfile"):
            continue
        (image, _), = from_images(path.read_text())
        assert image in (f"alignloop/base:{VERSION}", f"alignloop/base-cuda:{VERSION}"), path.name
        assert "HEALTHCHECK" in path.read_text(), path.name
    mlflow = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    lock = (REPO / "requirements" / "lock-cpu.txt").read_text()
    for pin in re.findall(r"(mlflow|psycopg)(?:\[binary\])?==([\d.]+)", mlflow):
        assert f"{pin[0]}=={pin[1]}\n" in lock, f"mlflow.Dockerfile pins {pin}, the lock differs"


def test_dockerignore_keeps_state_and_keys_out():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "a whitelist: nothing enters the build context unless named"
    assert not any(line.startswith("!deploy") or ".alignloop" in line for line in lines)


# ---- Kubernetes --------------------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
# Strategic-merge list keys of the fields deploy/'s patches touch; other lists are replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath"}


def merge(base, patch, strategic: bool):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge_field(key, out[key], value, strategic)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def merge_field(key: str, base, patch, strategic: bool):
    if strategic and key in MERGE_KEYS and isinstance(base, list) and isinstance(patch, list):
        by = MERGE_KEYS[key]
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, b in enumerate(out) if b.get(by) == item.get(by)), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item, strategic)
        return out
    return merge(base, patch, strategic)


def pod_templates(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [spec["template"]]
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    return []


def containers(obj: dict) -> list[dict]:
    return [c for t in pod_templates(obj)
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def render(folder: Path) -> list[dict]:
    """`kustomize build folder` for the fields deploy/ uses."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(k) - {"apiVersion", "kind", "resources", "namespace", "images", "patches",
                            "secretGenerator", "generatorOptions"}
    assert not unsupported, f"{folder}: the test renderer does not know {unsupported}"
    objects: list[dict] = []
    for entry in k.get("resources", []):
        path = folder / entry
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    options = k.get("generatorOptions", {})
    for gen in k.get("secretGenerator", []):
        assert options.get("disableNameSuffixHash"), "names with a content hash are not rendered here"
        data = {}
        for name in gen.get("files", []):
            data[name] = base64.b64encode((folder / name).read_bytes()).decode()
        for name in gen.get("envs", []):
            for line in (folder / name).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = base64.b64encode(value.encode()).decode()
        metadata = {"name": gen["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque",
                        "data": data})
    for entry in k.get("patches", []):
        assert set(entry) == {"path"}, f"{folder}: only patch files are rendered here"
        for patch in yaml.safe_load_all((folder / entry["path"]).read_text()):
            target = [o for o in objects if o["kind"] == patch["kind"]
                      and o["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(target) == 1, f"{entry['path']}: no single {patch['kind']} {patch['metadata']['name']}"
            strategic = "." not in patch["apiVersion"].split("/")[0] or "k8s.io" in patch["apiVersion"]
            i = objects.index(target[0])
            objects[i] = merge(objects[i], patch, strategic)
    for rule in k.get("images", []):
        for obj in objects:
            for c in containers(obj):
                name, _, tag = c["image"].rpartition(":")
                if name == rule["name"]:
                    c["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    return objects


def key(obj: dict) -> tuple:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def comparable(objects: list[dict]) -> list[dict]:
    """Sorted, with Secret data decoded (kubectl wraps its base64 lines)."""
    out = []
    for obj in sorted(objects, key=key):
        if obj["kind"] == "Secret":
            obj = {**obj, "data": {k: base64.b64decode("".join(v.split())) for k, v in obj["data"].items()}}
        out.append(obj)
    return out


@pytest.fixture(scope="module")
def secrets_folder(tmp_path_factory) -> Path:
    """deploy/secrets with throwaway files in place of the keys an operator writes."""
    folder = tmp_path_factory.mktemp("secrets")
    shutil.copy(DEPLOY / "secrets" / "kustomization.yaml", folder)
    (folder / "credentials.json").write_text('{"app_key": "test-app", "operator_key": "test-operator"}')
    (folder / "store.env").write_text("PGPASSWORD=test\n")
    return folder


@pytest.fixture(scope="module")
def rendered(secrets_folder) -> dict[str, list[dict]]:
    out = {name: render(DEPLOY / "overlays" / name) for name in OVERLAYS}
    out["ppo-multinode"] = render(DEPLOY / "jobs" / "ppo-multinode")
    out["secrets"] = render(secrets_folder)
    return out


def kubectl_kustomize(folder: Path) -> list[dict] | None:
    if shutil.which("kubectl") is None:
        return None
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("name", [*OVERLAYS, "ppo-multinode", "secrets"])
def test_renderer_matches_kubectl_kustomize(rendered, secrets_folder, name):
    folder = {"ppo-multinode": DEPLOY / "jobs" / "ppo-multinode", "secrets": secrets_folder}.get(
        name, DEPLOY / "overlays" / name)
    expected = kubectl_kustomize(folder)
    if expected is None:
        pytest.skip("kubectl is not installed: the renderer is not cross-checked")
    assert comparable(rendered[name]) == comparable(expected)


def k8s_validator(obj: dict):
    group_version = obj["apiVersion"]
    group, _, version = group_version.rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    path = K8S_SCHEMAS / f"{obj['kind'].lower()}{suffix}.json"
    assert path.is_file(), f"no schema for {group_version} {obj['kind']}: add it to {K8S_SCHEMAS}"
    definitions = json.loads((K8S_SCHEMAS / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=registry)


def strict(schema):
    """A CRD's structural schema with unknown fields refused, as kubeconform's strict mode does."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def strimzi_validator(obj: dict):
    for path in STRIMZI_SCHEMAS.glob("*.json"):
        crd = json.loads(path.read_text())
        if obj["apiVersion"] == f"{crd['group']}/{crd['version']}" and obj["kind"] == crd["kind"]:
            return jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"]))
    raise AssertionError(f"no schema for {obj['apiVersion']} {obj['kind']}")


@pytest.mark.parametrize("name", [*OVERLAYS, "ppo-multinode", "secrets"])
def test_manifests_validate_against_their_schemas(rendered, name):
    for obj in rendered[name]:
        validator = strimzi_validator(obj) if "strimzi.io" in obj["apiVersion"] else k8s_validator(obj)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, f"{key(obj)}: {errors}"


def by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.mark.parametrize("name", [*OVERLAYS, "ppo-multinode"])
def test_manifests_pin_images_and_hold_no_secrets(rendered, name):
    for obj in rendered[name]:
        assert obj["kind"] != "Secret", f"{key(obj)}: Secrets come from deploy/secrets, never an overlay"
        for c in containers(obj):
            assert_pinned(c["image"], str(key(obj)))
            if c["image"].startswith("alignloop/"):
                assert c["image"].endswith(f":{VERSION}"), c["image"]
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "valueFrom" in env, f"{key(obj)}: {env['name']} must come from a Secret"
        for template in pod_templates(obj):
            # Service links would inject ALIGNLOOP_<SERVICE>_PORT=tcp://..., which are setting names.
            assert template["spec"].get("enableServiceLinks") is False, f"{key(obj)}: enableServiceLinks"
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True, key(obj)


def container_env(objects: list[dict], obj: dict, container: dict) -> dict[str, str | None]:
    maps = by_key(objects)
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ("ConfigMap", ref) in maps, f"{key(obj)}: ConfigMap {ref} is not deployed"
        env.update(maps[("ConfigMap", ref)]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_kubernetes_sets_what_each_service_reads(rendered, overlay, service):
    objects = rendered[overlay]
    deployment = by_key(objects)[("Deployment", SERVICES[service][2])]
    container, = deployment["spec"]["template"]["spec"]["containers"]
    check_env(service, container_env(objects, deployment, container), f"{overlay} {SERVICES[service][2]}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_addresses_reach_services_that_select_the_right_pods(rendered, overlay):
    objects = rendered[overlay]
    maps = by_key(objects)
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for dep in deployments:
        for c in containers(dep):
            for field, port_field in ADDRESS_PORTS.items():
                value = container_env(objects, dep, c).get(f"ALIGNLOOP_{field.upper()}")
                if value is None:
                    continue
                host, port = value.rsplit(":", 1)
                service = maps[("Service", host)]
                svc_port, = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
                backends = [d for d in deployments if selects(service["spec"]["selector"], d)]
                assert len(backends) == 1, f"{value}: {len(backends)} Deployments behind it"
                backend, = containers(backends[0])
                served = container_env(objects, backends[0], backend)
                assert served["ALIGNLOOP_HOST"] == "0.0.0.0"
                assert container_port(backend, svc_port["targetPort"]) == listen_port(served, port_field), \
                    f"{value} does not reach the port {backends[0]['metadata']['name']} listens on"


# The runner is one replica by design (it runs one pipeline at a time); every other gRPC service scales out.
SINGLE_REPLICA = {"alignloop-pipeline"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_clients_reach_every_replica(rendered, overlay):
    """gRPC holds one connection per address and a ClusterIP balances connections: the Services that clients
    call must be headless (one DNS address per ready pod, which the channels' round_robin calls in turn), and
    their servers must recycle connections so that clients resolve again and find new replicas."""
    objects = rendered[overlay]
    maps = by_key(objects)
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    named = {container_env(objects, dep, c).get(f"ALIGNLOOP_{field.upper()}")
             for dep in deployments for c in containers(dep) for field in ADDRESS_PORTS} - {None}
    assert len(named) == len(ADDRESS_PORTS), named
    for address in named:
        service = maps[("Service", address.rsplit(":", 1)[0])]
        name = service["metadata"]["name"]
        if name in SINGLE_REPLICA:
            continue
        assert service["spec"].get("clusterIP") == "None", f"{overlay} {name}: not headless"
        backend, = [d for d in deployments if selects(service["spec"]["selector"], d)]
        c, = containers(backend)
        age = Settings(grpc_max_connection_age_s=container_env(objects, backend, c)
                       ["ALIGNLOOP_GRPC_MAX_CONNECTION_AGE_S"]).grpc_max_connection_age_s
        assert 0 < age <= 600, f"{overlay} {name}: connections kept {age} s"


def selects(selector: dict, deployment: dict) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert found, f"{container['name']} has no port named {port}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_probes_ask_the_services_health(rendered, overlay):
    for dep in (o for o in rendered[overlay] if o["kind"] == "Deployment"):
        c, = containers(dep)
        assert "readinessProbe" in c and "livenessProbe" in c, f"{key(dep)}: probes"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                continue
            if "exec" in probe:
                tool, name = probe["exec"]["command"]
                assert tool == "alignloop-probe" and name in probe_names(), f"{key(dep)}: {probe}"
            elif "grpc" in probe:
                # grpc.health.v1 (alignloop/grpc_health.py): "" is ready, "liveness" is alive. Restarting a
                # pod because a dependency is down would not bring the dependency back.
                assert probe["grpc"]["port"] in [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
                wanted = "" if kind == "readinessProbe" else LIVENESS
                assert probe["grpc"].get("service", "") == wanted, f"{key(dep)} {kind}: {probe}"
                assert probe.get("timeoutSeconds", 1) >= 2, f"{key(dep)} {kind}: a 1 s default is too tight"
            else:
                action = probe.get("httpGet") or probe["tcpSocket"]
                container_port(c, action["port"])
    gateway, = containers(by_key(rendered[overlay])[("Deployment", "alignloop-gateway")])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Every gRPC service is asked natively: no Python process is spawned in a pod every ten seconds.
    for name in GRPC_SERVICES:
        c, = containers(by_key(rendered[overlay])[("Deployment", name)])
        assert "grpc" in c["readinessProbe"], f"{name}: {c['readinessProbe']}"


GRPC_SERVICES = ("alignloop-policy", "alignloop-policy-canary", "alignloop-reward", "alignloop-feedback",
                 "alignloop-pipeline")


SERVING = ("alignloop-gateway", "alignloop-feedback", "alignloop-reward", "alignloop-policy",
           "alignloop-policy-canary")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_drain_before_they_stop(rendered, overlay):
    """A pod that answers calls pauses (preStop) while its endpoint's removal spreads, then drains the calls in
    flight for ALIGNLOOP_DRAIN_S, all within its grace period, so that a rolling update drops no call."""
    objects = rendered[overlay]
    for name in SERVING:
        dep = by_key(objects)[("Deployment", name)]
        c, = containers(dep)
        pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = Settings(**{"drain_s": container_env(objects, dep, c)["ALIGNLOOP_DRAIN_S"]}).drain_s
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert 1 <= pause and drain >= 30, f"{overlay} {name}: pause {pause} s, drain {drain} s"
        assert grace >= pause + drain + 10, f"{overlay} {name}: {grace} s of grace < {pause} + {drain} + 10"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_autoscaling_budgets_and_schedule(rendered, overlay):
    objects = rendered[overlay]
    maps = by_key(objects)
    for name in ("alignloop-policy", "alignloop-policy-canary", "alignloop-pipeline"):
        spec = maps[("Deployment", name)]["spec"]["template"]["spec"]
        c, = spec["containers"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert spec["nodeSelector"], name
    hpa = maps[("HorizontalPodAutoscaler", "alignloop-gateway")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in maps
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in maps[("Deployment", "alignloop-gateway")]["spec"], "the HPA owns the count"
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    protected = {b["metadata"]["name"] for b in budgets}
    assert {"alignloop-gateway", "alignloop-policy", "alignloop-feedback"} <= protected
    for budget in budgets:
        assert any(selects(budget["spec"]["selector"]["matchLabels"], d) for d in deployments), key(budget)
    for service in (o for o in objects if o["kind"] == "Service"):
        assert any(selects(service["spec"]["selector"], d) for d in deployments), key(service)
    cron = maps[("CronJob", "alignloop-pipeline-schedule")]
    c, = containers(cron)
    assert "alignloop pipeline run" in " ".join(c["command"])
    env = container_env(objects, cron, c)
    gateway_port = maps[("Service", env["ALIGNLOOP_HOST"])]["spec"]["ports"][0]["port"]
    assert int(env["ALIGNLOOP_GATEWAY_PORT"]) == gateway_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_referenced_are_the_ones_deploy_secrets_makes(rendered, overlay):
    made = {o["metadata"]["name"]: set(o["data"]) for o in rendered["secrets"]}
    for obj in rendered[overlay] + rendered["ppo-multinode"]:
        for template in pod_templates(obj):
            for volume in template["spec"].get("volumes", []):
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in made, key(obj)
                    assert "credentials.json" in made[volume["secret"]["secretName"]]
            for c in template["spec"]["containers"]:
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in made.get(ref["name"], ()), f"{key(obj)}: {ref}"
    # The gateway and the CronJob read their keys from HOME/credentials.json.
    for kind, name in (("Deployment", "alignloop-gateway"), ("CronJob", "alignloop-pipeline-schedule")):
        obj = by_key(rendered[overlay])[(kind, name)]
        c, = containers(obj)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert container_env(rendered[overlay], obj, c)["ALIGNLOOP_HOME"] in mounts, name


def strimzi_kafka_version() -> str:
    docs = yaml.safe_load_all((DEPLOY / "kafka" / "kafka.yaml").read_text())
    kafka, = [d for d in docs if d["kind"] == "Kafka"]
    return kafka["spec"]["kafka"]["version"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_cluster_topics_and_bootstrap_address(rendered, overlay):
    objects = rendered[overlay]
    kafka, = [o for o in objects if o["kind"] == "Kafka"]
    cluster = kafka["metadata"]["name"]
    for obj in objects:
        if obj["kind"] in ("KafkaNodePool", "KafkaTopic"):
            assert obj["metadata"]["labels"]["strimzi.io/cluster"] == cluster, key(obj)
    pools = [o for o in objects if o["kind"] == "KafkaNodePool"]
    assert {r for p in pools for r in p["spec"]["roles"]} == {"controller", "broker"}, "KRaft: no ZooKeeper"
    topics = {o["spec"]["topicName"]: o["spec"] for o in objects if o["kind"] == "KafkaTopic"}
    assert set(topics) == set(TOPICS)
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    materializers = by_key(objects)[("Deployment", "alignloop-materializer")]["spec"]["replicas"]
    for name, spec in topics.items():
        assert spec["replicas"] <= brokers and int(spec["config"]["min.insync.replicas"]) <= spec["replicas"]
        assert spec["partitions"] >= materializers, f"{name}: materializers beyond the partitions sit idle"
    plain, = [lst for lst in kafka["spec"]["kafka"]["listeners"] if not lst["tls"]]
    config = by_key(objects)[("ConfigMap", "alignloop-config")]["data"]
    assert config["ALIGNLOOP_KAFKA_BOOTSTRAP_SERVERS"] == f"{cluster}-kafka-bootstrap:{plain['port']}"


def test_multinode_ppo_job(rendered):
    objects = rendered["ppo-multinode"]
    job = by_key(objects)[("Job", "alignloop-ppo")]
    spec = job["spec"]
    c, = containers(job)
    nnodes = int(next(a for a in c["command"] if a.startswith("--nnodes=")).split("=")[1])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nnodes
    endpoint = next(a for a in c["command"] if a.startswith("--rdzv_endpoint=")).split("=")[1]
    service = by_key(objects)[("Service", spec["template"]["spec"]["subdomain"])]
    pod_0 = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert endpoint == f"{pod_0}:{service['spec']['ports'][0]['port']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    nproc = int(next(a for a in c["command"] if a.startswith("--nproc_per_node=")).split("=")[1])
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == nproc
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "ALIGNLOOP_REWARD_ADDRESS" in env and "PGPASSWORD" in env


# ---- docs --------------------------------------------------------------------------------------------------

def test_production_guide_is_linked_and_covers_operations():
    guide = (REPO / "docs" / "production.md").read_text().lower()
    assert "docs/production.md" in (REPO / "README.md").read_text()
    for topic in ("sizing", "partitions", "consumer group", "torchrun", "upgrade", "backup", "promotion",
                  "strimzi", "postgresql", "mlflow", "policy-canary"):
        assert topic in guide, f"docs/production.md says nothing about {topic}"
