"""The deployment assets in deploy/: they parse, they agree with the CLI and with each other, and every
metric the Grafana dashboard and the alert rules use is one the running daemon really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from collections.abc import Iterator

import click
import orjson
import pytest
import yaml

from consumers.demo import DEMO_SHOP_SEED
from stream.settings import KafkaSettings, Settings, parse_kafka_config
from tests.helpers import (
    SESSION_TIMEOUT_MS, committed_offsets, create_topics, end_offsets, http_get, produce, wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
METRIC = re.compile(r"(?<![A-Za-z0-9_])profiles_[a-z_]+")
NO_DOCKER = "no Docker engine on this machine (CI has none): the image build is checked where one exists"


# ---------------------------------------------------------------------------------------------- helpers

def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def cli_command(name: str) -> click.Command:
    from consumers.cli import main

    return main.commands[name]


def cli_envvars(command: str) -> set[str]:
    """Environment variables a `profiles <command>` invocation reads (the group's and the command's)."""
    from consumers.cli import main

    names: set[str] = set()
    for param in [*main.params, *cli_command(command).params]:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def parse_with_env(command: str, args: list[str], env: dict[str, str],
                   monkeypatch: pytest.MonkeyPatch) -> dict:
    """Parse `profiles <command> args...` with only `env` set among the CLI's variables; returns its params."""
    for name in cli_envvars(command):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return cli_command(command).make_context(command, list(args)).params


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def metrics_port() -> int:
    """The metrics port the image turns on (deploy/Dockerfile: ENV PROFILES_METRICS_PORT)."""
    match = re.search(r"^ENV PROFILES_METRICS_PORT=(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "deploy/Dockerfile sets no PROFILES_METRICS_PORT"
    return int(match.group(1))


def k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.y*ml")):
        with path.open() as f:
            docs.extend((path, doc) for doc in yaml.safe_load_all(f) if doc is not None)
    return docs


def k8s_one(kind: str) -> dict:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())


def dashboard_panels() -> list[dict]:
    """Every panel, rows' nested panels included; rows themselves are section headers, not panels."""
    out: list[dict] = []
    for panel in dashboard()["panels"]:
        out.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return out


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def readme_anchors() -> set[str]:
    """GitHub's anchors for the headings of deploy/README.md."""
    anchors = set()
    for line in (DEPLOY / "README.md").read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


# ---------------------------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_cuda_base_non_root_user_and_profiles_entrypoint():
    instructions = dockerfile_instructions()

    def value(word: str) -> list[str]:
        return [rest for w, rest in instructions if w == word]

    froms = value("FROM")
    assert froms and froms[-1].split()[0].startswith("nvidia/cuda:"), froms
    assert "runtime" in froms[-1], "a CUDA runtime image (not devel) keeps the image small"
    users = value("USER")
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    assert json.loads(value("ENTRYPOINT")[-1]) == ["profiles"]
    assert json.loads(value("CMD")[-1]) == ["run"]
    assert value("EXPOSE") == [str(metrics_port())]
    assert "/healthz" in value("HEALTHCHECK")[-1]

    # torch comes from a PyTorch (CUDA) wheel index, before the project.
    runs = value("RUN")
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert "--index-url" in runs[torch_step]
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install .*(/src|\s\.)(\s|$)", r))
    assert torch_step < project_step

    # Every COPY source exists (the context is the repository root), and the packages are all copied.
    copied = set()
    for rest in value("COPY"):
        *sources, _dest = [a for a in rest.split() if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            copied.add(src.strip("/"))
    packages = re.search(r"packages\s*=\s*\[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"([^"]+)"', packages):
        assert package in copied, f"package {package} is not copied into the image"


def docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], check=False, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(3600)
def test_image_builds_and_its_entrypoint_answers():
    if not docker_engine():
        pytest.skip(NO_DOCKER)
    tag = f"profiles:test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run(["docker", "build", "-f", "deploy/Dockerfile", "-t", tag, "."], cwd=ROOT,
                           check=False, capture_output=True, text=True, timeout=3500)
    assert build.returncode == 0, build.stderr[-4000:]
    try:
        user = subprocess.run(["docker", "image", "inspect", "-f", "{{.Config.User}}", tag],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert user and user.split(":")[0] not in ("root", "0")
        helped = subprocess.run(["docker", "run", "--rm", "--no-healthcheck", tag, "run", "--help"],
                                check=False, capture_output=True, text=True, timeout=300)
        assert helped.returncode == 0, helped.stderr[-2000:]
        assert "PROFILES_METRICS_PORT" in helped.stdout
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], check=False, capture_output=True)


# ---------------------------------------------------------------------------------------------- Compose

def test_compose_runs_kafka_in_kraft_mode_beside_the_service_and_monitoring():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"kafka", "topics", "profiles", "prometheus", "grafana"} <= set(services)

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = compose_env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    for key in ("KAFKA_NODE_ID", "KAFKA_CONTROLLER_QUORUM_VOTERS", "KAFKA_CONTROLLER_LISTENER_NAMES", "CLUSTER_ID",
                "KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS"):
        assert key in env, f"KRaft needs {key}"
    assert not any("ZOOKEEPER" in key for key in env)
    assert "healthcheck" in kafka

    profiles = services["profiles"]
    assert profiles["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / profiles["build"]["context"]).resolve() == ROOT
    assert profiles["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"

    # The topics service creates the topics the daemon reads and writes.
    topics_script = " ".join(services["topics"]["command"])
    env = compose_env(profiles)
    for topic in [*env["PROFILES_INPUT_TOPICS"].split(","), env["PROFILES_OUTPUT_TOPIC"], env["PROFILES_DLQ_TOPIC"]]:
        assert re.search(rf"(?<![\w.-]){re.escape(topic)}(?![\w.-])", topics_script), f"topic {topic} is not created"


def test_compose_configures_the_daemon_only_through_variables_the_cli_reads(monkeypatch):
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    run_vars = cli_envvars("run")
    env = compose_env(services["profiles"])
    assert set(env) <= run_vars, f"not read by `profiles run`: {sorted(set(env) - run_vars)}"
    assert env["KAFKA_BOOTSTRAP_SERVERS"].split(":")[0] == "kafka"
    # ... and the values parse as `profiles run` would parse them.
    params = parse_with_env("run", [], env, monkeypatch)
    assert params["metrics_port"] == metrics_port()
    assert params["input_topics"] == tuple(env["PROFILES_INPUT_TOPICS"].split(","))  # parsed into topics
    assert services["profiles"]["ports"] == [f"{metrics_port()}:{metrics_port()}"]

    gpu = load_yaml(DEPLOY / "compose.gpu.yaml")["services"]["profiles"]
    assert set(compose_env(gpu)) <= run_vars
    assert parse_with_env("run", [], {**env, **compose_env(gpu)}, monkeypatch)["device"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]

    traffic = services["traffic"]
    assert set(compose_env(traffic)) <= cli_envvars(traffic["command"][0])
    params = parse_with_env(traffic["command"][0], traffic["command"][1:], compose_env(traffic), monkeypatch)
    assert params["topic"] in env["PROFILES_INPUT_TOPICS"].split(",")
    # The shipped model is served the shop it was trained in (in the classic shop, the default of `generate`,
    # it is behind counting on two fields: docs/model.md), as in `profiles demo`.
    assert env["PROFILES_MODEL"] == "demo" and params["shop_seed"] == DEMO_SHOP_SEED


def test_compose_monitoring_mounts_the_files_in_deploy():
    compose = load_yaml(DEPLOY / "compose.yaml")
    prometheus, grafana = compose["services"]["prometheus"], compose["services"]["grafana"]
    mounts = {}
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            assert (DEPLOY / source).exists(), f"{source} is mounted but does not exist"
            mounts[target] = DEPLOY / source

    config = load_yaml(mounts["/etc/prometheus/prometheus.yml"])
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts, f"rule file {rule_file} is not mounted"
    targets = [t for job in config["scrape_configs"] if job["job_name"] == "profiles"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"profiles:{metrics_port()}"]

    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    prometheus_port = prometheus["ports"][0].split(":")[-1]
    assert datasources[0]["url"] == f"http://prometheus:{prometheus_port}"
    provider = load_yaml(provisioning / "dashboards" / "profiles.yaml")["providers"][0]
    dashboards = [t for t in mounts if t.startswith(provider["options"]["path"] + "/")]
    assert [mounts[t] for t in dashboards] == [DEPLOY / "grafana" / "dashboard.json"]


# ---------------------------------------------------------------------------------------------- Kubernetes

def test_every_k8s_manifest_parses_and_names_its_kind():
    docs = k8s_docs()
    assert docs
    for path, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert doc["metadata"]["name"], path
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget", "ServiceMonitor"} <= kinds


def test_deployment_gpu_probes_and_rollout():
    deployment = k8s_one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = k8s_one("ConfigMap")["data"]
    assert ports["metrics"] == metrics_port() == int(config["PROFILES_METRICS_PORT"])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == metrics_port()

    # Old pod out first: a surge pod would need a spare GPU and could find no partition to own.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > 30  # the daemon's own shutdown budget
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "partition" in (K8S / "deployment.yaml").read_text().split("replicas:")[0].lower(), \
        "say next to replicas that they must not exceed the input partition count"

    pdb = k8s_one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_deployment_settings_come_from_the_configmap_and_the_secret(monkeypatch):
    deployment, configmap, secret = k8s_one("Deployment"), k8s_one("ConfigMap"), k8s_one("Secret")
    # A password with what broke the shell-style split before the credentials were quoted: a space, a
    # backslash, a double quote, a dollar sign.
    secret["stringData"]["sasl-password"] = 'p4ss w\\rd"$x'
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
    secret_refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert secret_refs, "no credentials from a Secret"
    for ref in secret_refs:
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], ref
    for volume in deployment["spec"]["template"]["spec"]["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            assert all(item["key"] in secret["stringData"] for item in volume["secret"].get("items", []))

    # Every variable is read by `profiles run`, or feeds one through Kubernetes' $(NAME) expansion,
    # and every $(NAME) is defined before it is used (Kubernetes leaves unknown ones as they are).
    env: dict[str, str] = dict(configmap["data"])
    referenced: set[str] = set()
    for item in container["env"]:
        if "value" in item:
            value = item["value"]
            for name in re.findall(r"\$\((\w+)\)", value):
                assert name in env, f"$({name}) in {item['name']} is not defined before it"
                referenced.add(name)
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret["stringData"][ref["key"]]
    stray = set(env) - cli_envvars("run") - referenced
    assert not stray, f"not read by `profiles run` and not used by another variable: {sorted(stray)}"

    # The expanded environment parses, and carries the credentials to librdkafka (redacted in logs).
    params = parse_with_env("run", container.get("args", ["run"])[1:], env, monkeypatch)
    kafka = KafkaSettings(params["bootstrap_servers"], parse_kafka_config(params["kafka_config"]))
    conf = kafka.client_config()
    assert conf["security.protocol"] == configmap["data"]["KAFKA_SECURITY_PROTOCOL"]
    assert conf["sasl.username"] == secret["stringData"]["sasl-username"]
    assert conf["sasl.password"] == secret["stringData"]["sasl-password"]
    ca_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "kafka-tls")
    assert conf["ssl.ca.location"].startswith(ca_mount + "/")
    assert kafka.redacted()["sasl.password"] == "***"
    assert params["device"] == "cuda" and params["metrics_port"] == metrics_port()


def test_service_and_servicemonitor_scrape_the_metrics_port():
    deployment, service, monitor = k8s_one("Deployment"), k8s_one("Service"), k8s_one("ServiceMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port()
    (port,) = service["spec"]["ports"]
    assert port["port"] == metrics_port() and port["targetPort"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])


def test_hpa_and_prometheusrule_stay_in_step():
    hpa = k8s_one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == k8s_one("Deployment")["metadata"]["name"]
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert k8s_one("PrometheusRule")["spec"]["groups"] == load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]


# ---------------------------------------------------------------------------------------------- alerts, dashboard

def test_alert_rules_are_complete_prometheus_rule_groups():
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    anchors = readme_anchors()
    names = []
    for rule in alert_rules():
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: deploy/README.md has no section #{anchor}"
        names.append(rule["alert"])
    assert len(names) == len(set(names))

    used = {name for rule in alert_rules() for name in METRIC.findall(rule["expr"])}
    for needed in ("profiles_consumer_lag_records", "profiles_dead_letters_published_total", "profiles_ready",
                   "profiles_restore_duration_seconds", "profiles_last_progress_timestamp_seconds",
                   "profiles_commit_failures_total", "profiles_transaction_failures_total"):
        assert needed in used, f"no alert on {needed}"


def test_dashboard_panels_all_query_prometheus():
    board = dashboard()
    panels = dashboard_panels()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    exprs = "\n".join(dashboard_exprs())
    for needed in ("profiles_events_consumed_total", "profiles_consumer_lag_records",
                   "profiles_event_time_lag_seconds_bucket", "profiles_invalid_events_total",
                   "profiles_profiles_published_total", "profiles_users_in_state", "profiles_state_bytes",
                   "profiles_device_memory_bytes", "profiles_ready", "profiles_shop_habit_evidence",
                   "profiles_top_categories_lean", "profiles_stream_calibration_map"):
        assert needed in exprs, f"no panel on {needed}"
    assert re.search(r"histogram_quantile\([^,]+, sum by \(le, stage\) \(rate\(profiles_batch_duration_seconds_bucket",
                     exprs), "batch latency by stage"
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in board["templating"]["list"])


# ---------------------------------------------------------------------------------------------- the real scrape

def scrape_names(text: str) -> set[str]:
    """Series names a scrape offers: sample names, and what each `# TYPE` line implies (a histogram's
    _bucket/_sum/_count, a counter's _total) even while a labelled metric has no samples yet."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def scraped(broker) -> Iterator[set[str]]:
    """Names in /metrics of a daemon that consumed a few valid and invalid records."""
    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.broker import free_port
    from stream.generator import generate
    from stream.metrics import Health, Metrics, serve

    suffix = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(broker.bootstrap_servers)
    settings = Settings(kafka=kafka, input_topics=(f"events-{suffix}",), output_topic=f"profiles-{suffix}",
                        group_id=f"group-{suffix}", batch_max_ms=100, session_timeout_ms=SESSION_TIMEOUT_MS,
                        device="cpu", metrics_address="127.0.0.1")
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    events = generate(users=20, events=200, seed=11).events
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events]
            + [(b"u-bad", b"not json"), (b"u-bad", b'{"type": "click"}')])

    metrics, health, port = Metrics(), Health(settings.stall_after_s), free_port()
    server = serve(metrics, health, port, "127.0.0.1")
    stop = threading.Event()
    thread = threading.Thread(target=ProfileDaemon(settings, load_updater(settings), metrics, stop, health).run,
                              daemon=True)
    thread.start()
    try:
        ends = end_offsets(kafka, topic)
        wait_until(lambda: committed_offsets(kafka, settings.group_id, topic) == ends, 60, "the records to be consumed")
        status, body = http_get(port, "/metrics")
        assert status == 200
    finally:
        stop.set()
        thread.join(timeout=30)
        server.shutdown()
        server.server_close()
    names = scrape_names(body)
    assert "profiles_events_consumed_total" in names and "profiles_invalid_events_total" in names
    yield names


@pytest.mark.parametrize("where", ["dashboard", "alerts"])
def test_every_metric_used_is_exported_by_the_daemon(where, scraped):
    exprs = dashboard_exprs() if where == "dashboard" else [rule["expr"] for rule in alert_rules()]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) >= 7, f"found only {sorted(used)} in the {where}: is the metric pattern still right?"
    missing = sorted(used - scraped)
    assert not missing, f"the {where} uses metrics the daemon does not export: {missing}"
