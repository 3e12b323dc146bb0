"""What `helm install` creates, for default and non-default values."""

from __future__ import annotations

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inferstack_operator import config as opconfig

from .conftest import CASES, CHART, CHART_CRD, NAMESPACE, find, only

KUBE_VERSION = "1.31.0"
CRD = yaml.safe_load(CHART_CRD.read_text())
(CRD_VERSION,) = [v for v in CRD["spec"]["versions"] if v["storage"]]
CR_SCHEMA = CRD_VERSION["schema"]["openAPIV3Schema"]
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def container(objs: list[dict]) -> dict:
    (c,) = only(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(objs: list[dict]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objs)["env"]}


def validate_cr(obj: dict) -> None:
    assert obj["apiVersion"] == f"{CRD['spec']['group']}/{CRD_VERSION['name']}"
    assert obj["kind"] == CRD["spec"]["names"]["kind"]
    jsonschema.validate(obj, CR_SCHEMA)


@pytest.mark.parametrize("case", sorted(CASES))
def test_objects_are_valid_kubernetes(rendered: dict, case: str) -> None:
    objs = rendered[case]["objects"]
    assert objs
    for obj in objs:
        if obj["kind"] == "InferenceService":
            validate_cr(obj)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_api_server_admitted_every_object(control_plane, rendered: dict, case: str) -> None:
    # Installed for real: the CRD from crds/ first (the sample's InferenceService needs it), then
    # every object of the manifest, each admitted and stored by the API server.
    assert control_plane.get("CustomResourceDefinition", None, CRD["metadata"]["name"]) is not None
    assert sorted(rendered[case]["found"]) == sorted((o["kind"], o["metadata"]["name"])
                                                     for o in rendered[case]["objects"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_and_namespace(rendered: dict, case: str) -> None:
    for obj in rendered[case]["objects"]:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", obj["metadata"]
        assert labels.get("helm.sh/chart") == "inferstack-0.1.0"
        if obj["kind"] != "InferenceService":
            assert labels.get("app.kubernetes.io/name") == "inferstack"
            assert labels.get("app.kubernetes.io/instance") == "inferstack"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_operator_deployment(rendered: dict) -> None:
    objs = rendered["default"]["objects"]
    dep = only(objs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == only(objs, "ServiceAccount")["metadata"]["name"]
    c = container(objs)
    assert c["image"] == f"ghcr.io/inferstack/operator:{APP_VERSION}"
    assert c["command"] == ["inferstack-operator"]
    assert "--standalone" in c["args"]
    assert "--all-namespaces" in c["args"]
    assert not [a for a in c["args"] if a.startswith("--namespace")]
    # kopf's liveness endpoint and the probe must agree on port and path.
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    probe = c["livenessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}.get(probe["port"], probe["port"])
    assert (port, probe["path"]) == (8080, "/healthz")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert {"name": mounts["/tmp"], "emptyDir": {}} in pod["volumes"]


def test_operator_env_names_are_the_ones_the_operator_reads(rendered: dict) -> None:
    names = set(env(rendered["default"]["objects"]))
    assert names <= set(opconfig.OPERATOR_ENV)
    assert {opconfig.ENV_WEB_IMAGE, opconfig.ENV_WORKER_IMAGE, opconfig.ENV_WORKER_GPU_IMAGE,
            opconfig.ENV_REDIS_IMAGE, opconfig.ENV_IMAGE_PULL_POLICY} <= names


def test_default_images_match_the_operator_defaults(rendered: dict) -> None:
    # One set of defaults: the chart's values and the operator's fallbacks must not diverge.
    values = env(rendered["default"]["objects"])
    defaults = opconfig.OperatorSettings()
    assert values[opconfig.ENV_WEB_IMAGE] == defaults.web_image
    assert values[opconfig.ENV_WORKER_IMAGE] == defaults.worker_image
    assert values[opconfig.ENV_WORKER_GPU_IMAGE] == defaults.worker_gpu_image
    assert values[opconfig.ENV_REDIS_IMAGE] == defaults.redis_image
    assert values[opconfig.ENV_IMAGE_PULL_POLICY] == defaults.image_pull_policy
    assert values[opconfig.ENV_CLUSTER_DOMAIN] == defaults.cluster_domain


def test_custom_images(rendered: dict) -> None:
    objs = rendered["custom-images"]["objects"]
    c = container(objs)
    assert c["image"] == "registry.example.com/ml/operator:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert env(objs) == {
        opconfig.ENV_WEB_IMAGE: "registry.example.com/ml/web:1.2.3",
        opconfig.ENV_WORKER_IMAGE: "registry.example.com/ml/worker:1.2.3",
        opconfig.ENV_WORKER_GPU_IMAGE: "registry.example.com/ml/worker-gpu:1.2.3-cuda",
        opconfig.ENV_REDIS_IMAGE: "registry.example.com/redis:7.4.6",
        opconfig.ENV_IMAGE_PULL_POLICY: "Always",
        opconfig.ENV_CLUSTER_DOMAIN: "corp.example",
        opconfig.ENV_KEDA_NAMESPACE: "autoscalers",
        opconfig.ENV_ALLOWED_IMAGES: "registry.example.com/ml/,registry.example.com/redis:",
    }
    # What the operator makes of them.
    settings = opconfig.OperatorSettings.from_env(env(objs))
    assert settings.keda_namespace == "autoscalers"
    assert settings.allowed_images == ("registry.example.com/ml/", "registry.example.com/redis:")
    pod = only(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "ml-operator"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert find(objs, "ServiceAccount") == []
    for binding in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-operator", "namespace": NAMESPACE}]


def test_namespaced_watch(rendered: dict) -> None:
    objs = rendered["namespaced"]["objects"]
    args = container(objs)["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]


def test_paused_without_rbac(rendered: dict) -> None:
    objs = rendered["paused-no-rbac"]["objects"]
    assert only(objs, "Deployment")["spec"]["replicas"] == 0
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]


def test_sample_is_off_by_default(rendered: dict) -> None:
    assert find(rendered["default"]["objects"], "InferenceService") == []


def test_sample_inference_service(rendered: dict) -> None:
    sample = only(rendered["sample"]["objects"], "InferenceService")
    validate_cr(sample)
    assert sample["metadata"]["name"] == "resnet"
    assert sample["spec"] == CASES["sample"]["sample"]["spec"]
    # No finalizer: `helm uninstall` may remove the operator before the sample (see handlers.resync).
    assert sample["metadata"]["labels"][opconfig.EPHEMERAL_LABEL] == "true"
    # The chart's default sample spec is valid too (and CPU-only, to run anywhere).
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    validate_cr({**sample, "spec": values["sample"]["spec"]})
    assert values["sample"]["spec"]["worker"]["gpu"] == 0


def test_cr_schema_check_is_not_vacuous(rendered: dict) -> None:
    sample = copy.deepcopy(only(rendered["sample"]["objects"], "InferenceService"))
    sample["spec"]["worker"]["gpu"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_cr(sample)


def heredoc(notes: str) -> dict:
    match = re.search(r"<<'YAML'\n(.*?)\nYAML\n", notes, re.S)
    assert match, notes
    return yaml.safe_load(match.group(1))


def test_notes_tell_the_next_commands(rendered: dict) -> None:
    notes = rendered["default"]["notes"]
    assert f"kubectl apply -n {NAMESPACE} -f - <<'YAML'" in notes
    # The resource NOTES asks the user to apply is valid against the CRD.
    cr = heredoc(notes)
    validate_cr(cr)
    name = cr["metadata"]["name"]
    assert f"kubectl port-forward -n {NAMESPACE} svc/{name} 8080:80" in notes
    assert "curl -X POST -F image=@cat.jpg http://127.0.0.1:8080/predict" in notes
    assert "all namespaces" in notes


def test_notes_for_namespaced_and_sample(rendered: dict) -> None:
    notes = rendered["namespaced"]["notes"]
    assert "team-a, team-b" in notes
    assert "kubectl apply -n team-a" in notes
    notes = rendered["sample"]["notes"]
    assert "kubectl apply" not in notes
    assert "inferenceservice/resnet --for=condition=Ready" in notes
    assert f"kubectl port-forward -n {NAMESPACE} svc/resnet 8080:8000" in notes


def test_docs_inference_services_are_valid() -> None:
    repo = CHART.parent.parent
    docs = "".join(p.read_text() for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))])
    blocks = re.findall(r"<<'YAML'\n(.*?)\nYAML\n", docs, re.S)
    assert blocks
    for block in blocks:
        validate_cr(yaml.safe_load(block))


def test_notes_say_what_the_operator_may_do(rendered: dict) -> None:
    notes = rendered["default"]["notes"]
    assert "cluster-wide mode" in notes and "EVERY namespace" in notes and "Secrets" in notes
    assert "set watchNamespaces" in notes
    notes = rendered["namespaced"]["notes"]
    assert "a Role in each of team-a, team-b only" in notes and "EVERY namespace" not in notes
    assert "Permissions" not in rendered["paused-no-rbac"]["notes"]
