"""The Dagster layer, in one package: assets, checks, jobs, schedules, automation, resources and
partitions. Thin over the core: each asset calls a `laion_vq.stages` function and turns its result into
metadata. `laion_vq.definitions` assembles them into the code location."""

import signal
import threading
import warnings

import dagster as dg

from laion_vq import settings

# Before any definition reads a setting: the instance's own settings file (`$DAGSTER_HOME/laion_vq.env`),
# so the webserver, the daemon, run workers and shell runs on one instance all see the same settings.
settings.load_instance_settings()

# A shell run started in the background (`dagster asset materialize … &`, nohup) inherits SIGINT ignored, and
# Dagster maps SIGTERM to SIGINT's handler while it executes a plan in process: SIGTERM was ignored too and
# `kill` could not stop the run. Python's usual SIGINT handler makes both stop it (the run is marked failed).
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Three start-up warnings, explained here and silenced (only these messages):
# - `backfill_policy` is a beta parameter; it is what batches a 10,000-partition backfill into runs of
#   8 (download) and 256 (encoder) shards instead of one run per shard, and the tests pin its plan.
# - `laion_vq_pipeline` (metadata → tar → codes for a few shards: the demo, one-shard CLI runs) mixes the
#   download and encoder policies; Dagster then batches it by the smaller one (8), which is what a
#   few-shard run wants. Backfills use the assets' own policies and never mix the two.
# - partitioned asset checks are a Preview feature of Dagster 1.13; they are what gives each shard its own
#   check result in the UI (`laion_vq.defs.checks` says how we use them, and the tests pin it).
warnings.filterwarnings(
    "ignore", message=r"Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning
)
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy` of function `asset`", category=dg.BetaWarning)
warnings.filterwarnings("ignore", message=r"Asset job laion_vq_pipeline materializes assets with varying")
