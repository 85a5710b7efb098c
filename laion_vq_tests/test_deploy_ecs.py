"""The ECS deployment for real, against moto's ECS/S3/Logs/Secrets Manager server on 127.0.0.1.

The instance is the one we ship: `deploy/dagster.yaml` + `deploy/ecs/instance.yaml` (the
`LaionEcsRunLauncher`, S3 compute logs), every name from the environment, in a fresh PostgreSQL database;
the task definitions registered are `deploy/ecs/task-definition-{run,gpu}.json` with their placeholders
filled as an operator's `envsubst` would. A real `dagster-webserver` loads the code location and launches
runs through the launcher as the UI's launchpad and *Materialize* button do; then the tasks moto received
are read back with `ecs.describe_tasks`:

- an `encode_shards` run (GPU job tags) and a Materialize of `code_parquets` (an `__ASSET_JOB` run with no
  job tags, as backfills and sensors make them) both start from the GPU task definition (CUDA image) on
  the GPU capacity provider, with `resourceRequirements: GPU 1` in the container overrides;
- a `download_shards` run starts from the CPU task definition on Fargate with no GPU;
- every task's command is `dagster api execute_run` for its own run, its environment comes from the task
  definition, the database URL only as a Secrets Manager reference, never a value.

The run coordinator is Dagster's default one here (the webserver launches at once); the queued one in
production calls the same launcher from the daemon.
"""

from __future__ import annotations

import json
import string
import time

import pytest
import yaml
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import deserialize_value

from laion_vq.testing.dagster_services import PRODUCTION_YAML, REPO

ECS_DIR = REPO / "deploy" / "ecs"
CLUSTER = "laion-vq"
GPU_PROVIDER = "laion-vq-gpu"
SECRET_NAME = "laion-vq/dagster-pg-url"


@pytest.fixture()
def aws():
    pytest.importorskip("moto.server")
    from laion_vq.testing.aws import moto_aws

    with moto_aws() as env:
        yield env


def _register_task_definitions(ecs, values: dict[str, str]) -> dict[str, dict]:
    """Register the shipped task definition templates, placeholders filled as `envsubst` does."""
    registered = {}
    for name in ("run", "gpu", "services"):
        text = string.Template((ECS_DIR / f"task-definition-{name}.json").read_text()).substitute(values)
        registered[name] = ecs.register_task_definition(**json.loads(text))["taskDefinition"]
    return registered


def _ecs_account(boto3, pg_url: str) -> tuple[dict[str, str], dict[str, dict]]:
    """What an operator creates once (deploy/README.md, ECS): cluster, GPU capacity provider with its
    instances, log group, compute-log bucket, the database URL secret, the two task definitions."""
    ecs = boto3.client("ecs")
    secret_arn = boto3.client("secretsmanager").create_secret(Name=SECRET_NAME, SecretString=pg_url)["ARN"]
    boto3.client("s3").create_bucket(Bucket="laion-vq-logs")
    boto3.client("logs").create_log_group(logGroupName="/laion-vq/runs")
    ecs.create_capacity_provider(
        name=GPU_PROVIDER,
        autoScalingGroupProvider={
            "autoScalingGroupArn": "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:1:"
            "autoScalingGroupName/laion-vq-gpu",
            "managedScaling": {"status": "ENABLED", "targetCapacity": 100},
            "managedTerminationProtection": "DISABLED",
        },
    )
    ecs.create_cluster(clusterName=CLUSTER, capacityProviders=["FARGATE", GPU_PROVIDER])
    ec2 = boto3.client("ec2")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    gpu_hosts = ec2.run_instances(ImageId=ami, InstanceType="g5.2xlarge", MinCount=3, MaxCount=3)["Instances"]
    for host in gpu_hosts:  # the GPU instances the capacity provider has scaled out, joined to the cluster
        ecs.register_container_instance(
            cluster=CLUSTER, instanceIdentityDocument=json.dumps({"instanceId": host["InstanceId"]})
        )
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # as ECS's own VPC templates do
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)]
    group = ec2.create_security_group(VpcId=vpc, GroupName="laion-vq-runs", Description="runs")["GroupId"]
    values = {
        "AWS_REGION": "us-east-1",
        "LAION_VQ_CPU_IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/laion-vq:1.0.0",
        "LAION_VQ_GPU_IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/laion-vq:1.0.0-cuda",
        "LAION_VQ_ECS_EXECUTION_ROLE_ARN": "arn:aws:iam::123456789012:role/laion-vq-execution",
        "LAION_VQ_ECS_TASK_ROLE_ARN": "arn:aws:iam::123456789012:role/laion-vq-run",
        "LAION_VQ_STORAGE": "s3://laion-vq-data/v1",
        "LAION_VQ_METADATA": "s3://laion-vq-data/laion400m-meta/",
        "LAION_VQ_CHECKPOINT": "s3://laion-vq-data/models/vqgan_gumbel_f8/last.ckpt",
        "LAION_VQ_PG_URL_SECRET_ARN": secret_arn,
        "LAION_VQ_ECS_LOG_GROUP": "/laion-vq/runs",
        "LAION_VQ_ECS_SERVICES_ROLE_ARN": "arn:aws:iam::123456789012:role/laion-vq-services",
        "LAION_VQ_ECS_CLUSTER": CLUSTER,
        "LAION_VQ_ECS_GPU_CAPACITY_PROVIDER": GPU_PROVIDER,
        "LAION_VQ_ECS_SUBNETS": ", ".join(subnets),
        "LAION_VQ_ECS_SECURITY_GROUPS": group,
        "LAION_VQ_LOGS_BUCKET": "laion-vq-logs",
        "LAION_VQ_LOGS_PREFIX": "compute-logs",
    }
    return values, _register_task_definitions(ecs, values)


def _task_of(instance, ecs, run_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run.tags.get("ecs/task_arn"):
            tasks = ecs.describe_tasks(cluster=run.tags["ecs/cluster"], tasks=[run.tags["ecs/task_arn"]])["tasks"]
            assert len(tasks) == 1, tasks
            return tasks[0]
        assert not run.is_finished, f"run {run_id} ended {run.status} before a task was started"
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} has no ECS task after {timeout:.0f} s")


def test_ecs_launcher_places_encoder_runs_on_gpu_tasks(tmp_path, monkeypatch, aws, pg_url):
    import boto3

    from laion_vq.testing.dagster_services import dagster_services

    values, taskdefs = _ecs_account(boto3, pg_url)
    ecs = boto3.client("ecs")
    # the daemon's environment, as the services task definition gives it
    (services_task,) = [c for c in taskdefs["services"]["containerDefinitions"] if c["name"] == "daemon"]
    env = {**aws, **{e["name"]: e["value"] for e in services_task["environment"]}, "LAION_VQ_NUM_SHARDS": "4"}
    env.pop("DAGSTER_HOME")
    for key, value in env.items():  # the webserver's environment, and this process's (it reads the runs)
        monkeypatch.setenv(key, value)
    overrides = yaml.safe_load((ECS_DIR / "instance.yaml").read_text())
    overrides["run_coordinator"] = {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"}
    home = tmp_path / "dagster_home"
    with (
        dagster_services(
            home, pg_url, env=env, overrides=overrides, daemon=False, instance_yaml=PRODUCTION_YAML
        ) as services,
        services.instance() as instance,
    ):
        from laion_vq.deploy.launchers.ecs import LaionEcsRunLauncher

        assert isinstance(instance.run_launcher, LaionEcsRunLauncher)
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"

        runs = {
            "encode_job": services.launch_run("encode_shards", {"dagster/partition": "00001"}),
            "materialize_codes": services.launch_run("__ASSET_JOB", {"dagster/partition": "00002"}, ["code_parquets"]),
            "download": services.launch_run("download_shards", {"dagster/partition": "00003"}),
        }
        tasks = {name: _task_of(instance, ecs, run_id) for name, run_id in runs.items()}
        stored = {name: instance.get_run_by_id(run_id) for name, run_id in runs.items()}

        # a step's stdout, as a run task captures it, lands under the configured bucket and prefix
        log_key = [runs["download"], "compute_logs", "image_tars"]
        with instance.compute_log_manager.capture_logs(log_key):
            print("downloading shard 00003", flush=True)
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="laion-vq-logs")["Contents"]]
        assert f"compute-logs/storage/{runs['download']}/compute_logs/image_tars.out" in keys, keys

    # the UI listens on the services task's localhost only (reached through ECS Exec port forwarding)
    (webserver,) = [c for c in taskdefs["services"]["containerDefinitions"] if c["name"] == "webserver"]
    assert webserver["command"][:3] == ["dagster-webserver", "-h", "127.0.0.1"]
    assert "portMappings" not in webserver or not webserver["portMappings"]

    # the Materialize run is a plain asset run: no job tags, only code_parquets selected
    materialize = stored["materialize_codes"]
    assert {k.to_user_string() for k in materialize.asset_selection} == {"code_parquets"}
    # …and was placed by its step's tags, which the launcher recorded on it
    assert materialize.tags["laion_vq/accelerator"] == "gpu"

    for name, task in tasks.items():
        run_id = runs[name]
        (container,) = task["overrides"]["containerOverrides"]
        assert container["name"] == "run"
        # the stock dagster-aws command: execute this very run from its code origin
        assert container["command"][:3] == ["dagster", "api", "execute_run"], container["command"]
        args = deserialize_value(container["command"][3], ExecuteRunArgs)
        assert args.run_id == run_id and args.job_origin.job_name == stored[name].job_name
        assert task["clusterArn"].endswith(f"cluster/{CLUSTER}")
        described = ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])["taskDefinition"]
        (definition,) = described["containerDefinitions"]
        environment = {e["name"]: e["value"] for e in definition["environment"]}
        assert environment["LAION_VQ_STORAGE"] == values["LAION_VQ_STORAGE"]
        # the database URL reaches the task as a Secrets Manager reference, resolved by ECS at start
        assert definition["secrets"] == [{"name": "DAGSTER_PG_URL", "valueFrom": values["LAION_VQ_PG_URL_SECRET_ARN"]}]
        assert pg_url not in json.dumps(task, default=str) + json.dumps(described, default=str)

        if name == "download":
            assert "resourceRequirements" not in container, container
            assert task["taskDefinitionArn"] == taskdefs["run"]["taskDefinitionArn"]
            assert definition["image"] == values["LAION_VQ_CPU_IMAGE"]
            assert environment["LAION_VQ_DEVICE"] == "cpu"
            assert task["launchType"] == "FARGATE"
            assert "laion_vq/accelerator" not in stored[name].tags
        else:
            assert container["resourceRequirements"] == [{"type": "GPU", "value": "1"}], container
            assert task["taskDefinitionArn"] == taskdefs["gpu"]["taskDefinitionArn"]
            assert definition["image"] == values["LAION_VQ_GPU_IMAGE"]
            assert environment["LAION_VQ_DEVICE"] == "cuda"
            assert task["capacityProviderName"] == GPU_PROVIDER
