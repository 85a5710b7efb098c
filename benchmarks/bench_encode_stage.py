"""The encode stage end to end (tar read + JPEG decode + encode + parquet write) vs the bare encoder.

Builds a shard the way img2dataset leaves it (webdataset tar of 256×256 JPEGs at quality 95 and a status
parquet) from real photos, then times, in the same run and on the same weights and images:

- reference: ``VQGANEncoder.encode_uint8`` on the already-decoded uint8 array (the model alone);
- ours: ``laion_vq.stages.encode_code_shard`` on the tar (everything a shard costs).

The ratio ours/reference is the fraction of model throughput the pipeline keeps; 1.0 means tar reading,
decoding and writing are fully hidden.

    python benchmarks/bench_encode_stage.py                          # CPU, full f8, 8 images
    python benchmarks/bench_encode_stage.py --device cuda --images 1024 --batch-size 128 --dtype bf16
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import encode_code_shard
from laion_vq.vqgan import DEFAULT_MODEL, MODELS, VQGANEncoder, get_model_config
from laion_vq.vqgan.reference import sample_photos

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def write_shard(layout: StorageLayout, images: np.ndarray) -> None:
    os.makedirs(layout.images_dir(), exist_ok=True)
    keys = [f"00000{i:04d}" for i in range(len(images))]
    with tarfile.open(layout.image_tar(0), "w") as tar:
        for key, img in zip(keys, images, strict=True):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            for ext, payload in (("jpg", buf.getvalue()), ("txt", b"caption"), ("json", json.dumps({}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    status = pa.table({"key": keys, "status": ["success"] * len(keys), "caption": keys, "url": keys})
    pq.write_table(status, layout.image_status(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = get_model_config(args.model)
    torch.manual_seed(0)
    model = VQGANEncoder(config).eval().to(args.device)
    photos = sample_photos(config.resolution)
    images = np.stack([photos[i % len(photos)] for i in range(args.images)])
    dtype = DTYPES[args.dtype]
    grid = config.code_grid(config.resolution)

    def bare() -> np.ndarray:
        return model.encode_uint8(images, batch_size=args.batch_size, dtype=dtype)

    with tempfile.TemporaryDirectory() as root:
        layout = StorageLayout(root)
        write_shard(layout, images)

        def stage() -> np.ndarray:
            result = encode_code_shard(
                layout,
                0,
                model_name=args.model,
                encode=lambda b, _keys: model.encode_uint8(b, batch_size=args.batch_size, dtype=dtype),
                grid=grid,
                n_embed=config.n_embed,
                image_size=config.resolution,
                batch_size=args.batch_size,
            )
            table = pq.read_table(result.path)
            return np.stack([np.frombuffer(b, np.int16).reshape(grid, grid) for b in table.column("code").to_pylist()])

        bare()  # warm-up
        best = {"reference (bare encoder)": float("inf"), "ours (encode stage)": float("inf")}
        outputs = {}
        for _ in range(args.repeats):
            for name, fn in (("reference (bare encoder)", bare), ("ours (encode stage)", stage)):
                start = time.perf_counter()
                outputs[name] = fn()
                best[name] = min(best[name], time.perf_counter() - start)

    ref_ips = args.images / best["reference (bare encoder)"]
    ours_ips = args.images / best["ours (encode stage)"]
    agree = float((outputs["reference (bare encoder)"] == outputs["ours (encode stage)"]).mean())
    print(f"model={args.model} device={args.device} dtype={args.dtype} images={args.images} batch={args.batch_size}")
    print(f"reference (bare encoder on decoded arrays): {ref_ips:8.2f} img/s")
    print(f"ours (tar → decode → encode → parquet):     {ours_ips:8.2f} img/s")
    print(f"ratio ours/reference: {ours_ips / ref_ips:.3f}   codes equal: {agree:.4f}")
    print("(codes may differ slightly: the stage encodes the JPEG-decoded images, the reference the originals)")


if __name__ == "__main__":
    main()
