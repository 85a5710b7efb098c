"""`LaionEcsRunLauncher`: dagster-aws's `EcsRunLauncher`, with runs placed by their steps' tags.

Everything is the stock launcher (task per run, `dagster api execute_run` command, worker health checks
for run monitoring, termination) except:

- **placement from the steps** (`placement.py`): a run holding the encoder step gets `GPU_TAGS` as run
  tags however it was created (job, backfill, sensor, Materialize button), so the stock launcher puts
  `resourceRequirements: GPU` in its container overrides;
- **a GPU task definition**: such runs start from `gpu_task_definition` (the CUDA image, EC2
  compatibility) and, with `gpu_capacity_provider`, on that capacity provider (GPU instances) instead of
  the default launch type; every other run (downloads, audits) starts from `task_definition` (the CPU
  image, Fargate);
- **network from the environment**: `subnets` and `security_groups` are comma-separated strings, so
  `{env: …}` works for them (the stock `run_task_kwargs` takes literals only).

Configured in `deploy/ecs/instance.yaml`; `deploy/README.md` explains each field.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster import Field, StringSource
from dagster_aws.ecs import EcsRunLauncher
from dagster_aws.ecs.container_context import EcsContainerContext

from laion_vq.dagster_internals import LaunchRunContext, ResumeRunContext
from laion_vq.deploy.launchers.placement import placed_run, wants_gpu


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class LaionEcsRunLauncher(EcsRunLauncher):
    def __init__(
        self,
        inst_data=None,
        gpu_task_definition: str | None = None,
        gpu_capacity_provider: str | None = None,
        subnets: str | None = None,
        security_groups: str | None = None,
        **kwargs: Any,
    ):
        if subnets:
            run_task_kwargs = dict(kwargs.pop("run_task_kwargs", None) or {})
            if "networkConfiguration" in run_task_kwargs:
                raise dg.DagsterInvariantViolationError(
                    "set either `subnets`/`security_groups` or run_task_kwargs.networkConfiguration, not both"
                )
            run_task_kwargs["networkConfiguration"] = {
                "awsvpcConfiguration": {
                    "subnets": _split(subnets),
                    "securityGroups": _split(security_groups),
                    "assignPublicIp": "DISABLED",
                }
            }
            kwargs["run_task_kwargs"] = run_task_kwargs
        super().__init__(inst_data=inst_data, **kwargs)
        self.gpu_capacity_provider = gpu_capacity_provider
        self.gpu_task_definition = None
        if gpu_task_definition:
            described = self.ecs.describe_task_definition(taskDefinition=gpu_task_definition)["taskDefinition"]
            names = [c.get("name") for c in described["containerDefinitions"]]
            if self.container_name not in names:
                raise dg.DagsterInvariantViolationError(
                    f"gpu_task_definition {gpu_task_definition} has no container named {self.container_name!r}"
                )
            self.gpu_task_definition = described["taskDefinitionArn"]

    @classmethod
    def config_type(cls):
        return {
            **super().config_type(),
            "gpu_task_definition": Field(
                StringSource,
                is_required=False,
                description="Task definition (family, family:revision or ARN) for runs that hold a GPU step.",
            ),
            "gpu_capacity_provider": Field(
                StringSource,
                is_required=False,
                description="Capacity provider (GPU instances) for runs that hold a GPU step.",
            ),
            "subnets": Field(StringSource, is_required=False, description="Comma-separated subnet ids."),
            "security_groups": Field(
                StringSource, is_required=False, description="Comma-separated security group ids."
            ),
        }

    def launch_run(self, context: LaunchRunContext) -> None:
        super().launch_run(context._replace(dagster_run=placed_run(self._instance, context.dagster_run)))

    def resume_run(self, context: ResumeRunContext) -> None:
        super().resume_run(context._replace(dagster_run=placed_run(self._instance, context.dagster_run)))

    def _run_task_kwargs(
        self, run: dg.DagsterRun, image: str | None, container_context: EcsContainerContext
    ) -> dict[str, Any]:
        gpu = wants_gpu(run.tags)
        if gpu and self.gpu_task_definition:
            container_context = container_context.merge(
                EcsContainerContext(task_definition_arn=self.gpu_task_definition)
            )
        kwargs = super()._run_task_kwargs(run, image, container_context)
        if gpu and self.gpu_capacity_provider:
            kwargs.pop("launchType", None)
            kwargs["capacityProviderStrategy"] = [{"capacityProvider": self.gpu_capacity_provider, "weight": 1}]
        return kwargs
