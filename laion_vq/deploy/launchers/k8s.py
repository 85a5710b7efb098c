"""`LaionK8sRunLauncher`: dagster-k8s's `K8sRunLauncher`, with runs placed by their steps' tags.

Everything is the stock launcher (a Kubernetes Job per run, worker health checks, termination, resume)
except where a run's pod goes:

- **placement from the steps** (`placement.py`): a run holding the encoder step gets its
  `dagster-k8s/config` (GPU limit, GPU toleration) as if it were a run tag, however the run was created
  (job, backfill, sensor, Materialize button);
- **`gpu_run_k8s_config`**: what such runs get on top, from the deployment, in dagster-k8s's own
  `run_k8s_config` shape — the CUDA image (`container_config.image`) and the node selector of the
  cluster's GPU nodes, whose label names differ between clusters (GPU operator, EKS, GKE), so they live
  in the Helm values, not in the code.

Configured as the Helm chart's `CustomRunLauncher` (`deploy/helm/values.yaml`).
"""

from __future__ import annotations

from typing import Any

from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig

from laion_vq.deploy.launchers.placement import placed_run, wants_gpu


class LaionK8sRunLauncher(K8sRunLauncher):
    def __init__(self, gpu_run_k8s_config: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.gpu_run_k8s_config = dict(gpu_run_k8s_config or {})

    @classmethod
    def config_type(cls):
        fields = DagsterK8sJobConfig.config_type_run_launcher()
        return {**fields, "gpu_run_k8s_config": fields["run_k8s_config"]}

    def get_container_context_for_run(self, dagster_run) -> K8sContainerContext:
        run = placed_run(self._instance, dagster_run)
        context = K8sContainerContext.create_for_run(run, self, include_run_tags=True)
        if wants_gpu(run.tags) and self.gpu_run_k8s_config:
            context = context.merge(
                K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(self.gpu_run_k8s_config))
            )
        return context
