"""Run launchers for deployments beyond one machine (`deploy/`): the stock dagster-aws and dagster-k8s
launchers, with each run placed by the tags its steps carry (`placement.py`), so encoder runs land on GPU
hosts and downloads on CPU hosts however the run was created.

`laion_vq.deploy.launchers.ecs.LaionEcsRunLauncher` (dagster-aws) and
`laion_vq.deploy.launchers.k8s.LaionK8sRunLauncher`
(dagster-k8s, the `deploy` extra) are imported by the instance (`run_launcher:` in its yaml), never by
the code location.
"""
