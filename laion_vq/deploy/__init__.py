"""Deployment and operations: run launchers that place GPU steps (`launchers/`), steps on many machines
through Celery (`distributed/`), and `recover_dead_runs` for shell runs whose worker died."""
