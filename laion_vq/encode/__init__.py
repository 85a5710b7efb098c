"""Encoding at device speed: the overlapped tar → decode → encode → parquet pipeline (no Dagster).

- `decode.py`: JPEG bytes → uint8 RGB batches; PIL on every core, or batched nvJPEG with a CPU fallback.
- `jpeg_header.py`: what a JPEG's header says (size, sampling, progressive) and which images nvJPEG may take.
- `engine.py`: the model on its device in `exact` or `fast` mode; fixed-shape batches, OOM backoff.
- `shard.py`: one shard's bookkeeping: status parquet, stored version, reconciliation, atomic publish.
- `pipeline.py`: the threads and queues that keep the encoder busy across all shards of a run.
"""
