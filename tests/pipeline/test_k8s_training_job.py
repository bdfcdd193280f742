"""The Kubernetes objects of an M-node training (pipeline/distributed/k8s.py) are valid and hang together.

There is no cluster here: each manifest is validated against the Kubernetes API's own OpenAPI schema, offline and
strict (unknown fields are errors), with the `kubernetes-validate` package, and the links between the objects that
no schema checks (the Service finds the pods, pod 0's DNS name is the rendezvous endpoint, one pod per node) are
asserted. Planted defects show that both kinds of check fail.
"""

import copy
import re

import kubernetes_validate
import pytest
import yaml

from pipeline.distributed import k8s
from tests.common import ROOT

K8S_VERSION = kubernetes_validate.latest_version()  # the newest schema the package bundles
NODES, GPUS = 2, 8
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PIPES_ENV = {"DAGSTER_PIPES_CONTEXT": "e30=", "DAGSTER_PIPES_MESSAGES": "e30="}


def _job(**kw) -> k8s.TrainingJob:
    args = {
        "name": k8s.job_name("5f1c0a3e-9b7d-4c1e-8f00-123456789abc", "ldm"),
        "namespace": "ldm",
        "image": "registry.example.com/ldm-pipeline:0.1.0",
        "stage": "ldm",
        "nodes": NODES,
        "processes": GPUS,
        "spec_json": '{"stage": "ldm"}',
        "grace_s": 120,
        "env": {**PIPES_ENV, "LDM_STORAGE_ROOT": "s3://ldm/storage"},
        "env_secrets": ("ldm-s3",),
        "service_account": "ldm-training",
    }
    return k8s.TrainingJob(**{**args, **kw})


def _by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


def _opt(command: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
    return value


def link_problems(objects: list[dict]) -> list[str]:
    """What would break an M-node training though every object is schema-valid."""
    o = _by_kind(objects)
    cm, svc, job = o["ConfigMap"], o["Service"], o["Job"]
    js, pod = job["spec"], job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    command, env = container["command"], {e["name"]: e for e in container["env"]}
    nodes = int(_opt(command, "nnodes"))
    problems = []
    if js.get("completionMode") != "Indexed":
        problems.append("not an indexed Job: pods have no index, hostname or stable DNS name")
    if not js.get("completions") == js.get("parallelism") == nodes:
        problems.append(f"completions/parallelism {js.get('completions')}/{js.get('parallelism')} != nodes {nodes}")
    if js.get("backoffLimit") != 0:
        problems.append("a failed pod is restarted alone, into a rendezvous that is gone")
    if svc["spec"].get("clusterIP") != "None":
        problems.append("the Service is not headless: no per-pod DNS records")
    if pod["spec"].get("subdomain") != svc["metadata"]["name"]:
        problems.append("pod subdomain is not the Service's name: pod names do not resolve")
    if not svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items():
        problems.append("the Service's selector does not select the Job's pods")
    port = svc["spec"]["ports"][0]["port"]
    if _opt(command, "rdzv-endpoint") != f"{job['metadata']['name']}-0.{svc['metadata']['name']}:{port}":
        problems.append(f"rendezvous endpoint {_opt(command, 'rdzv-endpoint')} is not pod 0's DNS name and port")
    if port not in [p["containerPort"] for p in container["ports"]]:
        problems.append("the container does not expose the rendezvous port")
    if _opt(command, "nproc-per-node") != container["resources"]["limits"].get("nvidia.com/gpu"):
        problems.append("processes per node != GPUs per pod")
    index = env.get("JOB_COMPLETION_INDEX", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
    if k8s.COMPLETION_INDEX_ANNOTATION not in index:
        problems.append("JOB_COMPLETION_INDEX is not the pod's completion index")
    names = [e["name"] for e in container["env"]]
    if "LDM_NODE_ADDR" not in names or names.index("LDM_NODE_ADDR") < names.index("JOB_COMPLETION_INDEX"):
        problems.append("LDM_NODE_ADDR is not defined after JOB_COMPLETION_INDEX (no $(…) expansion)")
    elif (
        env["LDM_NODE_ADDR"]["value"] != f"{job['metadata']['name']}-$(JOB_COMPLETION_INDEX).{pod['spec']['subdomain']}"
    ):
        problems.append("a pod's own address is not its DNS name")
    if _opt(command, "local-addr") != "$(LDM_NODE_ADDR)":
        problems.append("agents do not announce their DNS names (rank order, MASTER_ADDR)")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    spec_volume = volumes.get(mounts.get(k8s.SPEC_DIR, ""), {})
    if (
        spec_volume.get("configMap", {}).get("name") != cm["metadata"]["name"]
        or k8s.SPEC_PATH.rsplit("/")[-1] not in cm["data"]
    ):
        problems.append("the spec file the command reads is not the ConfigMap's")
    if command[-1] != k8s.SPEC_PATH:
        problems.append("the command does not read the mounted spec")
    return problems


# ---------------------------------------------------------------------------------------------------------------


def test_every_manifest_validates_against_the_kubernetes_api_schema_strictly():
    objects = k8s.manifests(_job())
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    for o in objects:
        assert kubernetes_validate.validate(o, K8S_VERSION, strict=True) == K8S_VERSION.rsplit(".", 1)[0]


def test_the_objects_hang_together_for_two_nodes_of_eight_gpus():
    job = _job()
    objects = k8s.manifests(job)
    assert link_problems(objects) == []
    o = _by_kind(objects)
    (container,) = o["Job"]["spec"]["template"]["spec"]["containers"]
    command, env = container["command"], {e["name"]: e.get("value") for e in container["env"]}
    assert o["Job"]["spec"]["completions"] == NODES and _opt(command, "nnodes") == str(NODES)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(GPUS)
    assert _opt(command, "rdzv-backend") == "c10d" and _opt(command, "rdzv-id") == job.name
    assert "--standalone" not in command and command[-2:] == ["pipeline.distributed.train_ldm", k8s.SPEC_PATH]
    # every pod carries the Pipes bootstrap (rank 0 alone writes to it), the storage root, the S3 secret
    assert PIPES_ENV.items() <= env.items() and env["LDM_STORAGE_ROOT"] == "s3://ldm/storage"
    assert container["envFrom"] == [{"secretRef": {"name": "ldm-s3"}}]
    assert o["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "ldm-training"
    assert o["ConfigMap"]["data"]["spec.json"] == '{"stage": "ldm"}'
    # pod 0's name sorts before every other pod's: torch gives the agent with the smallest address rank 0
    addresses = [job.pod_address(i) for i in range(12)]
    assert min(addresses) == job.pod_address(0)


def test_job_names_are_dns_labels_unique_per_attempt_and_leave_room_for_pod_hostnames():
    run = "5f1c0a3e-9b7d-4c1e-8f00-123456789abc"
    names = {k8s.job_name(run, stage, attempt) for stage in ("vae", "ldm") for attempt in ("0", "1")}
    assert len(names) == 4
    for name in names:
        assert DNS_LABEL.match(name) and len(f"{name}-9999") <= 63


@pytest.mark.parametrize(
    "plant,path,value",
    [
        ("misspelt field", ("Job", "spec", "completionsMode"), "Indexed"),
        ("wrong type", ("Job", "spec", "completions"), "2"),
        ("port as a string", ("Service", "spec", "ports", 0, "port"), "29400"),
        ("misspelt container field", ("Job", "spec", "template", "spec", "containers", 0, "envFrm"), []),
    ],
)
def test_a_planted_schema_defect_fails_validation(plant, path, value):
    objects = _by_kind(k8s.manifests(_job()))
    node = objects[path[0]]
    for key in path[1:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(objects[path[0]], K8S_VERSION, strict=True)


def _drop_completion_mode(o):
    del o["Job"]["spec"]["completionMode"]


def _other_subdomain(o):
    o["Job"]["spec"]["template"]["spec"]["subdomain"] = "ldm-train"


def _selector_mismatch(o):
    o["Service"]["spec"]["selector"] = {"job-name": "other"}


def _endpoint_at_pod_one(o):
    command = o["Job"]["spec"]["template"]["spec"]["containers"][0]["command"]
    i = next(i for i, a in enumerate(command) if a.startswith("--rdzv-endpoint="))
    command[i] = command[i].replace("-0.", "-1.")


def _one_completion_too_few(o):
    o["Job"]["spec"]["completions"] = o["Job"]["spec"]["parallelism"] = NODES - 1


@pytest.mark.parametrize(
    "plant",
    [_drop_completion_mode, _other_subdomain, _selector_mismatch, _endpoint_at_pod_one, _one_completion_too_few],
)
def test_a_planted_broken_link_is_schema_valid_but_caught(plant):
    objects = copy.deepcopy(k8s.manifests(_job()))
    plant(_by_kind(objects))
    for o in objects:  # the schema has no word on any of these
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    assert link_problems(objects), plant.__name__


def test_the_rbac_of_deploy_grants_the_step_pods_what_the_launcher_calls():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "helm" / "training-rbac.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    role, binding = _by_kind(docs)["Role"], _by_kind(docs)["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    missing = {k: v - granted.get(k, set()) for k, v in k8s.PERMISSIONS.items() if v - granted.get(k, set())}
    assert missing == {}
