"""Steps on many machines through Dagster's Celery executor (dagster-celery, the `deploy` extra).

- `executor.py`: `celery_pool_executor`, dagster-celery's executor with each step sent to the queue
  named after its pool (`gpu` for the encoder, `download` for everything else), redelivered when the
  worker running it dies;
- `definitions.py`: the code location for such a deployment, the same definitions as
  `laion_vq.definitions` with every job and backfill run on that executor.

`deploy/README.md` ("Celery workers") says how to start the workers.
"""
