"""The Kubernetes deployment: the Job specs dagster-k8s builds for our runs, from the Helm values we ship.

The run launcher is `deploy/helm/values.yaml`'s `customRunLauncher` (`LaionK8sRunLauncher`) as the chart
writes it into the instance, on the production instance (`deploy/dagster.yaml`, fresh PostgreSQL
database), pointed by a kubeconfig at a stand-in API server on 127.0.0.1 that records the Jobs it is sent
(no cluster here). A real `dagster-webserver` launches runs as the UI does:

- an `encode_shards` run and a Materialize of `code_parquets` (an `__ASSET_JOB` run with no job tags, as
  backfills and sensors make them) get a pod with `nvidia.com/gpu: 1` in its limits, the GPU toleration,
  the GPU nodes' selector and the CUDA image;
- a `download_shards` run gets none of those: the CPU image and the download resources.
"""

from __future__ import annotations

import time

import pytest
import yaml
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import deserialize_value

from laion_vq.testing.dagster_services import PRODUCTION_YAML, REPO

VALUES = REPO / "deploy" / "helm" / "values.yaml"
CPU_IMAGE = "REGISTRY/laion-vq:0.1.0"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _job_for(api, run_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in api.jobs_snapshot():
            if job["metadata"]["labels"].get("dagster/run-id") == run_id:
                return job
        time.sleep(0.2)
    raise AssertionError(f"no Kubernetes Job created for run {run_id} after {timeout:.0f} s")


def test_k8s_job_specs_put_encoder_runs_on_gpu_nodes(tmp_path, pg_url):
    pytest.importorskip("dagster_k8s")
    from laion_vq.testing.dagster_services import dagster_services
    from laion_vq.testing.k8s_api import FakeKubernetesAPI

    values = yaml.safe_load(VALUES.read_text())
    # the UI is never exposed: a ClusterIP service, no Ingress (deploy/README.md, "Security")
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP" and not values["ingress"]["enabled"]
    custom = values["runLauncher"]["config"]["customRunLauncher"]
    gpu_image = custom["config"]["gpu_run_k8s_config"]["container_config"]["image"]
    node_selector = custom["config"]["gpu_run_k8s_config"]["pod_spec_config"]["node_selector"]
    with FakeKubernetesAPI() as api:
        # the chart's rendering of `customRunLauncher`, outside a cluster: a kubeconfig instead of the pod's
        # service account
        launcher_config = {
            **custom["config"],
            "load_incluster_config": False,
            "kubeconfig_file": str(api.kubeconfig(tmp_path / "kubeconfig")),
        }
        overrides = {
            "run_launcher": {"module": custom["module"], "class": custom["class"], "config": launcher_config},
            "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"},
        }
        env = {"DAGSTER_CURRENT_IMAGE": CPU_IMAGE, "LAION_VQ_NUM_SHARDS": "4"}  # set by the chart on code servers
        with (
            dagster_services(
                tmp_path / "dagster_home",
                pg_url,
                env=env,
                overrides=overrides,
                daemon=False,
                instance_yaml=PRODUCTION_YAML,
            ) as services,
            services.instance() as instance,
        ):
            runs = {
                "encode_job": services.launch_run("encode_shards", {"dagster/partition": "00001"}),
                "materialize_codes": services.launch_run(
                    "__ASSET_JOB", {"dagster/partition": "00002"}, ["code_parquets"]
                ),
                "download": services.launch_run("download_shards", {"dagster/partition": "00003"}),
            }
            jobs = {name: _job_for(api, run_id) for name, run_id in runs.items()}
            stored = {name: instance.get_run_by_id(run_id) for name, run_id in runs.items()}

    assert {k.to_user_string() for k in stored["materialize_codes"].asset_selection} == {"code_parquets"}
    for name, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        limits = container.get("resources", {}).get("limits", {})
        args = container["args"]
        assert args[:3] == ["dagster", "api", "execute_run"], args
        assert deserialize_value(args[3], ExecuteRunArgs).run_id == runs[name]
        assert job["metadata"]["namespace"] == "laion-vq"
        # the database password from the chart's Secret, the settings from the shared ConfigMap
        password = {"secretKeyRef": {"name": "dagster-postgresql-secret", "key": "postgresql-password"}}
        assert {"name": "DAGSTER_PG_PASSWORD", "valueFrom": password} in container["env"]
        assert {"configMapRef": {"name": "laion-vq-settings"}} in container["envFrom"]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and not security["allowPrivilegeEscalation"]
        if name == "download":
            assert "nvidia.com/gpu" not in limits, container
            assert GPU_TOLERATION not in pod.get("tolerations", []), pod
            assert not pod.get("nodeSelector"), pod
            assert container["image"] == CPU_IMAGE
            assert container["resources"]["requests"] == {"cpu": "1", "memory": "3Gi"}
            assert "laion_vq/accelerator" not in stored[name].tags
        else:
            assert limits["nvidia.com/gpu"] == "1", container
            assert GPU_TOLERATION in pod["tolerations"], pod
            assert pod["nodeSelector"] == node_selector
            assert container["image"] == gpu_image
            assert container["resources"]["requests"] == {"cpu": "6", "memory": "24Gi"}
            assert stored[name].tags["laion_vq/accelerator"] == "gpu"
            assert stored[name].tags["dagster/image"] == gpu_image
