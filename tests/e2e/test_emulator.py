"""The API emulation behaves like the real API server where the operator and kopf depend on it.

Every check goes through the official `kubernetes` client (or a real `kopf run`), so the same tests also
pass against a real cluster (FTJ_E2E_KUBECONFIG); the garbage-collection checks need a controller-manager
there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from kubernetes import dynamic
from kubernetes.client.exceptions import ApiException

from finetune_operator.api import constants as c

pytestmark = pytest.mark.e2e

G, V, P = c.GROUP, c.VERSION, c.PLURAL


def ftj(name: str, **spec: object) -> dict:
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name, "labels": {"team": "a"}},
            "spec": {"model": {"name": "m"}, "dataset": {"source": "d", "format": "text-folders"}, **spec}}


def owner_ref(obj: dict) -> dict:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "blockOwnerDeletion": True}


def api_error(fn, *args, **kwargs) -> ApiException:
    with pytest.raises(ApiException) as info:
        fn(*args, **kwargs)
    return info.value


def test_create_fills_metadata_and_answers_201(api, namespace):
    data, code, _ = api.custom.create_namespaced_custom_object_with_http_info(
        G, V, namespace, P, {**ftj("a"), "status": {"phase": "Bogus"}})
    meta = data["metadata"]
    assert code == 201
    assert meta["namespace"] == namespace and meta["uid"] and meta["creationTimestamp"]
    assert meta["generation"] == 1 and int(meta["resourceVersion"]) > 0
    assert "status" not in data  # create ignores .status where a status subresource exists

    err = api_error(api.custom.create_namespaced_custom_object, G, V, namespace, P, ftj("a"))
    assert err.status == 409 and '"reason": "AlreadyExists"' in err.body.replace('":"', '": "')
    err = api_error(api.custom.get_namespaced_custom_object, G, V, namespace, P, "missing")
    assert err.status == 404 and "NotFound" in err.body and "kind" in err.body

    generated = api.core.create_namespaced_config_map(namespace, {"metadata": {"generateName": "cm-"}})
    assert generated.metadata.name.startswith("cm-") and len(generated.metadata.name) == 8
    svc = api.core.create_namespaced_service(namespace, {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    assert svc.spec.cluster_ip and svc.spec.type == "ClusterIP"
    headless = api.core.create_namespaced_service(namespace, {"metadata": {"name": "h"},
                                                              "spec": {"clusterIP": "None", "ports": [{"port": 1}]}})
    assert headless.spec.cluster_ip == "None"


def test_generation_resource_version_and_status_subresource(api, namespace):
    obj = api.custom.create_namespaced_custom_object(G, V, namespace, P, ftj("g"))
    rv0 = obj["metadata"]["resourceVersion"]

    # Metadata-only change: new resourceVersion, same generation.
    obj = api.custom.patch_namespaced_custom_object(G, V, namespace, P, "g", {"metadata": {"labels": {"x": "1"}}})
    assert obj["metadata"]["generation"] == 1 and obj["metadata"]["resourceVersion"] != rv0
    # A no-op patch changes nothing, not even the resourceVersion.
    same = api.custom.patch_namespaced_custom_object(G, V, namespace, P, "g", {"metadata": {"labels": {"x": "1"}}})
    assert same["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    # .status through the main resource is ignored; .spec through /status is ignored.
    obj = api.custom.patch_namespaced_custom_object(G, V, namespace, P, "g",
                                                    {"spec": {"model": {"name": "n"}}, "status": {"phase": "X"}})
    assert obj["metadata"]["generation"] == 2 and obj["spec"]["model"]["name"] == "n" and "status" not in obj
    obj = api.custom.patch_namespaced_custom_object_status(
        G, V, namespace, P, "g", {"spec": {"model": {"name": "o"}}, "status": {"phase": "Running"}})
    assert obj["status"] == {"phase": "Running"} and obj["spec"]["model"]["name"] == "n"
    assert obj["metadata"]["generation"] == 2  # status writes never bump generation

    # The same separation for built-in Jobs and Pods.
    job = api.batch.create_namespaced_job(namespace, {"metadata": {"name": "j"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}, "status": {"active": 5}})
    assert not job.status.active and job.spec.backoff_limit == 6 and job.spec.selector.match_labels
    job = api.batch.patch_namespaced_job_status("j", namespace, {"status": {"active": 1}, "spec": {"parallelism": 9}})
    assert job.status.active == 1 and job.spec.parallelism == 1
    job = api.batch.patch_namespaced_job("j", namespace, {"status": {"active": 7}, "spec": {"suspend": True}})
    assert job.status.active == 1 and job.spec.suspend and job.metadata.generation == 2
    pod = api.core.create_namespaced_pod(namespace, {"metadata": {"name": "p"}, "spec": {
        "containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running"}})
    assert pod.status.phase == "Pending"


def test_patch_flavours_and_optimistic_concurrency(api, namespace):
    cm = api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "p"}, "data": {"a": "1", "b": "2"}})
    # The official client sends strategic merge for built-ins (treated as merge patch: null deletes).
    cm = api.core.patch_namespaced_config_map("p", namespace, {"data": {"a": None, "c": "3"}})
    assert cm.data == {"b": "2", "c": "3"}
    rv = cm.metadata.resource_version
    # JSON patch with kopf's `test` on resourceVersion: succeeds when current, 422 when stale.
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
           {"op": "replace", "path": "/data/b", "value": "20"}]
    cm = api.core.patch_namespaced_config_map("p", namespace, ops)
    assert cm.metadata.finalizers == ["x/y"] and cm.data["b"] == "20"
    err = api_error(api.core.patch_namespaced_config_map, "p", namespace, ops)
    assert err.status == 422
    # Replace (PUT) with a stale resourceVersion is a Conflict.
    stale = api.core.read_namespaced_config_map("p", namespace)
    api.core.patch_namespaced_config_map("p", namespace, {"data": {"d": "4"}})
    err = api_error(api.core.replace_namespaced_config_map, "p", namespace, stale)
    assert err.status == 409 and "Conflict" in err.body
    api.core.patch_namespaced_config_map("p", namespace, [{"op": "remove", "path": "/metadata/finalizers"}])


def server_side_apply(api, path: str, body: dict, manager: str) -> dict:
    # Straight to the client's urllib3 pool: the generated ApiClient has no apply helper (and its request
    # helpers differ between kubernetes 36 and 37).
    cfg = api.client.configuration
    headers = {"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"}
    headers.update({a["key"]: a["value"] for a in cfg.auth_settings().values() if a.get("in") == "header"})
    response = api.client.rest_client.pool_manager.request(
        "PATCH", f"{cfg.host}{path}?fieldManager={manager}", body=json.dumps(body).encode(), headers=headers)
    assert response.status in (200, 201), response.data
    return json.loads(response.data)


def test_server_side_apply_for_one_field_manager(api, namespace):
    path = f"/api/v1/namespaces/{namespace}/configmaps/ssa"
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"a": "1", "b": "2"}},
            "data": {"x": "1", "y": "2"}}
    created = server_side_apply(api, path, body, "me")
    assert created["data"] == {"x": "1", "y": "2"} and created["metadata"]["uid"]
    body["data"] = {"x": "10"}
    del body["metadata"]["labels"]["b"]
    applied = server_side_apply(api, path, body, "me")
    # Fields the manager applied before and no longer applies are removed.
    assert applied["data"] == {"x": "10"} and applied["metadata"]["labels"] == {"a": "1"}
    assert applied["metadata"]["uid"] == created["metadata"]["uid"]


def test_finalizers_hold_deletion(api, namespace):
    api.custom.create_namespaced_custom_object(G, V, namespace, P, {**ftj("f"), "metadata": {
        "name": "f", "finalizers": ["e2e/hold"]}})
    deleted = api.custom.delete_namespaced_custom_object(G, V, namespace, P, "f")
    assert deleted["metadata"]["deletionTimestamp"]
    held = api.custom.get_namespaced_custom_object(G, V, namespace, P, "f")
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["generation"] == 2
    err = api_error(api.custom.patch_namespaced_custom_object, G, V, namespace, P, "f",
                    {"metadata": {"finalizers": ["e2e/hold", "e2e/new"]}})
    assert err.status == 422
    api.custom.patch_namespaced_custom_object(G, V, namespace, P, "f", {"metadata": {"finalizers": None}})
    assert api_error(api.custom.get_namespaced_custom_object, G, V, namespace, P, "f").status == 404


def _wait_gone(fn, *args, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fn(*args)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.05)
    raise AssertionError(f"{fn.__name__}{args} still exists after {timeout}s")


def test_owner_reference_garbage_collection(api, namespace, wait_for):
    owner = api.custom.create_namespaced_custom_object(G, V, namespace, P, ftj("owner"))
    other = api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "other-owner"}})
    other_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "other-owner", "uid": other.metadata.uid}
    api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "child",
                                                                   "ownerReferences": [owner_ref(owner)]}})
    api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "shared",
                                                                   "ownerReferences": [owner_ref(owner), other_ref]}})
    job = api.batch.create_namespaced_job(namespace, {"metadata": {"name": "child-job", "ownerReferences": [
        owner_ref(owner)]}, "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "c", "image": "i"}]}}}}).to_dict()
    pod_owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "child-job", "uid": job["metadata"]["uid"]}
    api.core.create_namespaced_pod(namespace, {"metadata": {"name": "grandchild", "ownerReferences": [pod_owner]},
                                               "spec": {"containers": [{"name": "c", "image": "i"}]}})

    api.custom.delete_namespaced_custom_object(G, V, namespace, P, "owner")
    _wait_gone(api.core.read_namespaced_config_map, "child", namespace)
    _wait_gone(api.batch.read_namespaced_job, "child-job", namespace)
    _wait_gone(api.core.read_namespaced_pod, "grandchild", namespace)  # cascades through the Job
    shared = wait_for(lambda: (cm := api.core.read_namespaced_config_map("shared", namespace)) and
                      len(cm.metadata.owner_references) == 1 and cm, what="dangling owner reference dropped")
    assert shared.metadata.owner_references[0].uid == other.metadata.uid


def test_job_deletion_orphans_pods_by_default_and_foreground_waits(api, namespace, wait_for):
    def job_with_pod(name: str) -> None:
        job = api.batch.create_namespaced_job(namespace, {"metadata": {"name": name}, "spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}})
        api.core.create_namespaced_pod(namespace, {"metadata": {"name": f"{name}-pod", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job.metadata.uid,
            "blockOwnerDeletion": True}]}, "spec": {"containers": [{"name": "c", "image": "i"}]}})

    job_with_pod("orphaning")
    api.batch.delete_namespaced_job("orphaning", namespace)  # batch/v1's default policy is Orphan
    _wait_gone(api.batch.read_namespaced_job, "orphaning", namespace)
    pod = wait_for(lambda: (p := api.core.read_namespaced_pod("orphaning-pod", namespace)) and
                   not p.metadata.owner_references and p, what="orphaned pod")
    assert pod.metadata.deletion_timestamp is None

    job_with_pod("fg")
    api.batch.delete_namespaced_job("fg", namespace, propagation_policy="Foreground")
    _wait_gone(api.core.read_namespaced_pod, "fg-pod", namespace)
    _wait_gone(api.batch.read_namespaced_job, "fg", namespace)


def test_graceful_pod_deletion_waits_for_the_kubelet(api, namespace):
    api.core.create_namespaced_pod(namespace, {"metadata": {"name": "bound"}, "spec": {
        "nodeName": "e2e-node", "containers": [{"name": "c", "image": "i"}]}})
    pod = api.core.delete_namespaced_pod("bound", namespace)
    assert pod.metadata.deletion_timestamp and pod.metadata.deletion_grace_period_seconds == 30
    assert api.core.read_namespaced_pod("bound", namespace).metadata.deletion_timestamp
    api.core.delete_namespaced_pod("bound", namespace, grace_period_seconds=0)
    _wait_gone(api.core.read_namespaced_pod, "bound", namespace)


def test_lists_selectors_and_namespaces(api, namespace):
    for name, team in (("l1", "a"), ("l2", "b"), ("l3", "a")):
        api.custom.create_namespaced_custom_object(G, V, namespace, P, {**ftj(name), "metadata": {
            "name": name, "labels": {"team": team, "tier": name}}})
    listed = api.custom.list_namespaced_custom_object(G, V, namespace, P, label_selector="team=a")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["l1", "l3"]
    assert int(listed["metadata"]["resourceVersion"]) >= max(
        int(i["metadata"]["resourceVersion"]) for i in listed["items"])
    names = lambda sel: [i["metadata"]["name"] for i in api.custom.list_cluster_custom_object(  # noqa: E731
        G, V, P, label_selector=sel)["items"] if i["metadata"]["namespace"] == namespace]
    assert names("team!=a") == ["l2"] and names("tier in (l1,l2)") == ["l1", "l2"] and names("!team") == []
    assert names("team,tier notin (l3)") == ["l1", "l2"]
    by_field = api.custom.list_namespaced_custom_object(G, V, namespace, P, field_selector="metadata.name=l2")
    assert [i["metadata"]["name"] for i in by_field["items"]] == ["l2"]
    assert namespace in [n.metadata.name for n in api.core.list_namespace().items]  # GET /api/v1/namespaces


def test_lists_are_chunked_by_limit_and_continue_like_the_real_server(api, kube, namespace):
    # API chunking (on by default since 1.9): `limit` items per page, `metadata.continue` while more remain, every
    # page at the first page's resourceVersion; an expired token is 410 Expired. Reflectors page with limit=500.
    for i in range(5):
        api.core.create_namespaced_config_map(namespace, {"metadata": {"name": f"page-{i}"}})
    first = api.core.list_namespaced_config_map(namespace, limit=2)
    assert [o.metadata.name for o in first.items] == ["page-0", "page-1"] and first.metadata.remaining_item_count == 3
    second = api.core.list_namespaced_config_map(namespace, limit=2, _continue=first.metadata._continue)
    last = api.core.list_namespaced_config_map(namespace, limit=2, _continue=second.metadata._continue)
    assert [o.metadata.name for o in second.items + last.items] == ["page-2", "page-3", "page-4"]
    assert not last.metadata._continue
    assert first.metadata.resource_version == second.metadata.resource_version == last.metadata.resource_version
    assert len(api.core.list_namespaced_config_map(namespace).items) == 5  # no limit: everything at once
    if kube.emulated:
        from .operator_helpers import faults

        faults(kube.url, {"expire": True}, action="drop-watches")
        err = api_error(api.core.list_namespaced_config_map, namespace, limit=2, _continue=first.metadata._continue)
        status = json.loads(err.body)
        assert err.status == 410 and status["reason"] == "Expired"
        # As the real server (storage/etcd3 handleCompactedErrorForPaging): the Status carries a new token that
        # continues after the same key at the latest version, an inconsistent list the message warns about.
        assert "use the continue token in this response" in status["message"]
        assert "inconsistent list" in status["message"]
        api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "page-5"}})
        rest = api.core.list_namespaced_config_map(namespace, limit=10, _continue=status["metadata"]["continue"])
        assert [o.metadata.name for o in rest.items] == ["page-2", "page-3", "page-4", "page-5"]
        assert int(rest.metadata.resource_version) > int(first.metadata.resource_version)


def test_namespace_deletion_empties_it(api, wait_for):
    api.core.create_namespace({"metadata": {"name": "e2e-doomed"}})
    api.core.create_namespaced_config_map("e2e-doomed", {"metadata": {"name": "x"}})
    api.core.delete_namespace("e2e-doomed")
    _wait_gone(api.core.read_namespace, "e2e-doomed")
    assert not api.core.list_namespaced_config_map("e2e-doomed").items
    err = api_error(api.core.create_namespaced_config_map, "e2e-doomed", {"metadata": {"name": "y"}})
    assert err.status == 404


def test_watch_resumes_from_resource_version_and_follows_selectors(api, namespace):
    api.custom.create_namespaced_custom_object(G, V, namespace, P, ftj("w1"))
    rv = api.custom.list_namespaced_custom_object(G, V, namespace, P)["metadata"]["resourceVersion"]
    api.custom.create_namespaced_custom_object(G, V, namespace, P, ftj("w2"))
    api.custom.patch_namespaced_custom_object(G, V, namespace, P, "w1", {"metadata": {"labels": {"team": "b"}}})
    api.custom.delete_namespaced_custom_object(G, V, namespace, P, "w2")

    def events(**query: str) -> list[tuple[str, str]]:
        # The raw watch stream (what kopf reads), not the client's Watch helper, whose handling of a
        # stream that ends by timeout differs between kubernetes 36 and 37.
        cfg = api.client.configuration
        headers = {a["key"]: a["value"] for a in cfg.auth_settings().values() if a.get("in") == "header"}
        url = f"{cfg.host}/apis/{G}/{V}/namespaces/{namespace}/{P}?" + urlencode({"watch": "true", "timeoutSeconds": "1", **query})
        response = api.client.rest_client.pool_manager.request("GET", url, headers=headers)
        assert response.status == 200, response.data
        lines = [json.loads(line) for line in response.data.decode().splitlines() if line.strip()]
        return [(e["type"], e["object"]["metadata"]["name"]) for e in lines if e["type"] != "BOOKMARK"]

    assert events(resourceVersion=rv) == [("ADDED", "w2"), ("MODIFIED", "w1"), ("DELETED", "w2")]
    # With a selector, an object leaving the selection is DELETED for that watcher.
    assert events(resourceVersion=rv, labelSelector="team=a") == [
        ("ADDED", "w2"), ("DELETED", "w1"), ("DELETED", "w2")]
    assert events() == [("ADDED", "w1")]  # no resourceVersion: the current state


@pytest.mark.emulation_only("compacts the emulation's event history")
def test_expired_history_answers_410_gone_and_a_fresh_listing_can_be_watched(api, kube, namespace):
    from .operator_helpers import faults

    api.custom.create_namespaced_custom_object(G, V, namespace, P, ftj("old"))
    rv = api.custom.list_namespaced_custom_object(G, V, namespace, P)["metadata"]["resourceVersion"]
    assert faults(kube.url, {"expire": True}, action="drop-watches")["expired"] is True
    cfg = api.client.configuration
    headers = {a["key"]: a["value"] for a in cfg.auth_settings().values() if a.get("in") == "header"}

    def watch(since: str) -> list[dict]:
        url = f"{cfg.host}/apis/{G}/{V}/namespaces/{namespace}/{P}?" + urlencode(
            {"watch": "true", "timeoutSeconds": "1", "resourceVersion": since})
        response = api.client.rest_client.pool_manager.request("GET", url, headers=headers)
        return [json.loads(line) for line in response.data.decode().splitlines() if line.strip()]

    (gone,) = watch(rv)  # the real server: an ERROR event with a 410 Status, then the stream ends
    assert gone["type"] == "ERROR" and gone["object"]["code"] == 410 and gone["object"]["reason"] == "Expired"
    fresh = api.custom.list_namespaced_custom_object(G, V, namespace, P)["metadata"]["resourceVersion"]
    assert [e for e in watch(fresh) if e["type"] != "BOOKMARK"] == []  # no 410 loop for a fresh listing


def test_discovery_serves_the_operator_resources(api):
    client = dynamic.DynamicClient(api.client)
    ftjs = client.resources.get(api_version=c.API_VERSION, kind=c.KIND)
    assert ftjs.namespaced and ftjs.name == P
    assert "status" in ftjs.subresources
    for api_version, kind in (("v1", "Pod"), ("v1", "Namespace"), ("batch/v1", "Job"), ("v1", "Event"),
                              ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("coordination.k8s.io/v1", "Lease"),
                              ("events.k8s.io/v1", "Event"), ("kopf.dev/v1", "ClusterKopfPeering")):
        assert client.resources.get(api_version=api_version, kind=kind)
    crd = api.extensions.read_custom_resource_definition(c.CRD_NAME)
    assert any(cond.type == "Established" and cond.status == "True" for cond in crd.status.conditions)


def test_custom_objects_are_validated_pruned_and_defaulted_by_their_crd(api, namespace):
    err = api_error(api.custom.create_namespaced_custom_object, G, V, namespace, P,
                    {**ftj("bad"), "spec": {"model": "not-an-object"}})
    assert err.status == 422 and "spec.model" in err.body and "spec.dataset" in err.body
    obj = api.custom.create_namespaced_custom_object(G, V, namespace, P, {**ftj("ok"), "spec": {
        **ftj("ok")["spec"], "notAField": 1}})
    assert "notAField" not in obj["spec"]  # pruned, as the real server does
    assert "hyperparameters" in obj["spec"]  # structural defaults applied
    status = api.custom.patch_namespaced_custom_object_status(G, V, namespace, P, "ok",
                                                              {"status": {"phase": "Running", "bogus": 1}})
    assert status["status"] == {"phase": "Running"}
    err = api_error(api.custom.patch_namespaced_custom_object, G, V, namespace, P, "ok",
                    {"spec": {"hyperparameters": {"epochs": -1}}})
    assert err.status == 422 and "epochs" in err.body


KOPF_OPERATOR = textwrap.dedent('''
    import os, pathlib
    import kopf, kubernetes

    @kopf.on.startup()
    def configure(settings, **_):
        settings.persistence.finalizer = "e2e.finetune.dev/kopf-finalizer"
        settings.watching.server_timeout = 30
        kubernetes.config.load_kube_config()

    @kopf.on.create("{group}", "{version}", "{plural}")
    def create(body, name, namespace, patch, **_):
        cm = {{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {{"name": f"{{name}}-child"}}, "data": {{"a": "1"}}}}
        kopf.adopt(cm, owner=body)
        kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, cm)
        patch.status["phase"] = "Created"

    @kopf.on.update("{group}", "{version}", "{plural}", field="spec")
    def update(patch, new, **_):
        patch.status["message"] = new["model"]["name"]

    @kopf.on.delete("{group}", "{version}", "{plural}")
    def delete(name, **_):
        pathlib.Path(os.environ["MARKER_DIR"], name).write_text("deleted")
''')


def test_a_real_kopf_operator_runs_against_the_api(api, kube, namespace, tmp_path, wait_for):
    script = tmp_path / "operator.py"
    script.write_text(KOPF_OPERATOR.format(group=G, version=V, plural=P))
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig), "MARKER_DIR": str(tmp_path)}
    log = (tmp_path / "kopf.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "kopf"), "run", "--standalone", "-n", namespace,
                             "--verbose", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
    kopf_log = lambda: (tmp_path / "kopf.log").read_text()[-4000:]  # noqa: E731
    try:
        api.custom.create_namespaced_custom_object(G, V, namespace, P, ftj("k"))
        obj = wait_for(lambda: (o := api.custom.get_namespaced_custom_object(G, V, namespace, P, "k"))
                       .get("status", {}).get("phase") == "Created" and o, timeout=60, what="kopf create handler")
        assert "e2e.finetune.dev/kopf-finalizer" in obj["metadata"]["finalizers"]
        child = api.core.read_namespaced_config_map("k-child", namespace)
        assert child.metadata.owner_references[0].uid == obj["metadata"]["uid"]

        api.custom.patch_namespaced_custom_object(G, V, namespace, P, "k", {"spec": {"model": {"name": "new"}}})
        wait_for(lambda: api.custom.get_namespaced_custom_object(G, V, namespace, P, "k")["status"].get("message")
                 == "new", timeout=30, what="kopf update handler")

        api.custom.delete_namespaced_custom_object(G, V, namespace, P, "k")
        wait_for(lambda: (tmp_path / "k").exists(), timeout=30, what="kopf delete handler")
        _wait_gone(api.custom.get_namespaced_custom_object, G, V, namespace, P, "k")
        _wait_gone(api.core.read_namespaced_config_map, "k-child", namespace)
        assert proc.poll() is None, kopf_log()
        assert "Traceback" not in kopf_log(), kopf_log()
    except BaseException:
        print(kopf_log())
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_concurrent_clients_do_not_lose_writes(api, namespace):
    api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "counter"}, "data": {}})
    errors: list[Exception] = []

    def writer(i: int) -> None:
        try:
            for j in range(10):
                api.core.patch_namespaced_config_map("counter", namespace, {"data": {f"k{i}-{j}": "1"}})
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(api.core.read_namespaced_config_map("counter", namespace).data) == 40


def test_job_pod_failure_policy_is_validated_like_the_real_server(api, namespace):
    """pkg/apis/batch/validation: restartPolicy Never, exit codes sorted/unique/non-zero for In, known container
    names, one requirement per rule, and podReplacementPolicy Failed (defaulted) with a podFailurePolicy."""
    def job(policy: dict, restart: str = "Never", **spec: object) -> dict:
        return {"metadata": {"name": "pfp"}, "spec": {"podFailurePolicy": policy, **spec, "template": {"spec": {
            "restartPolicy": restart, "containers": [{"name": "trainer", "image": "i"}]}}}}

    def rule(**r: object) -> dict:
        return {"rules": [{"action": "FailJob", **r}]}

    codes = {"containerName": "trainer", "operator": "In", "values": [2, 3]}
    cases = [
        (job(rule(onExitCodes=codes), restart="OnFailure"), 'spec.template.spec.restartPolicy: Invalid value: "OnFailure"'),
        (job(rule(onExitCodes={**codes, "values": [3, 2]})), "spec.podFailurePolicy.rules[0].onExitCodes.values: "
                                                             "Invalid value: [3, 2]: must be ordered"),
        (job(rule(onExitCodes={**codes, "values": [0, 2]})), "values[0]: Invalid value: 0: must not be 0 for the In operator"),
        (job(rule(onExitCodes={**codes, "values": [2, 2]})), "values[1]: Duplicate value: 2"),
        (job(rule(onExitCodes={**codes, "containerName": "other"})), "must be one of the container or initContainer names"),
        (job(rule(onExitCodes=codes, onPodConditions=[{"type": "DisruptionTarget", "status": "True"}])),
         "specifying both OnExitCodes and OnPodConditions is not supported"),
        (job(rule()), "specifying one of OnExitCodes and OnPodConditions is required"),
        (job({"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "Yes"}]}]}),
         'onPodConditions[0].status: Unsupported value: "Yes"'),
        (job({"rules": [{"action": "FailIndex", "onExitCodes": codes}]}), "requires the backoffLimitPerIndex to be set"),
        (job(rule(onExitCodes=codes), podReplacementPolicy="TerminatingOrFailed"),
         'spec.podReplacementPolicy: Unsupported value: "TerminatingOrFailed"'),
    ]
    for body, message in cases:
        err = api_error(api.batch.create_namespaced_job, namespace, body)
        assert err.status == 422 and message in json.loads(err.body)["message"], (message, err.body)
    created = api.batch.create_namespaced_job(namespace, job(rule(onExitCodes=codes)))
    assert created.spec.pod_replacement_policy == "Failed"  # the server's default with a podFailurePolicy


def test_custom_objects_keep_apiversion_and_kind_their_schema_does_not_declare(api):
    # kopf's peering CRDs declare neither; kopf's keep-alive PATCH failed with 500 when they were pruned.
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "e2e-kept-kind"}}
    try:
        created = api.custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)
        assert (created["apiVersion"], created["kind"]) == ("kopf.dev/v1", "ClusterKopfPeering")
        patched = api.custom.patch_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "e2e-kept-kind",
                                                         {"status": {"peer": {"priority": 1}}})
        assert patched["kind"] == "ClusterKopfPeering" and patched["status"]["peer"]["priority"] == 1
    finally:
        api.custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "e2e-kept-kind")
