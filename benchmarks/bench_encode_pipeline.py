"""The encode step end to end, three ways, in one run on the same weights and the same tars (issue 9).

(a) seed-style reference: the tar's JPEGs decoded by PIL in DataLoader workers, float batches through
    taming-transformers' own Encoder + GumbelQuantize (the full quantizer forward, as `GumbelVQ.encode`),
    fp32, codes to int16, a parquet per shard;
(b) the spine's stage as it was before the pipeline (`laion_vq/stages/codes.py` at commit SPINE_COMMIT, read
    from git): one shard at a time, decode a batch, encode it, decode the next;
(c) the overlapped pipeline (`laion_vq.encode`), all shards in one run, in each mode (`exact`, `fast`).

Prints images/s end to end (tar bytes in, code parquet published) and model-only (decoded uint8 already on
the device), the ratio of each to (a), GPU memory per image on CUDA, fast's compile time cold and warm
(a second process reusing the on-disk kernel cache), and how many codes `fast` and (b) share with `exact`.
Random weights (no checkpoint can be downloaded here) make near-ties common: the agreement is pessimistic.

    python benchmarks/bench_encode_pipeline.py                        # CPU: full f8, 2 shards x 8 images
    python benchmarks/bench_encode_pipeline.py --model vqgan_gumbel_f8_tiny --images 32
    python benchmarks/bench_encode_pipeline.py --images 4096 --shards 4 --batch-size 0   # on a GPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from laion_vq.encode.decode import ImageDecoder
from laion_vq.encode.engine import ModelEngine
from laion_vq.encode.pipeline import EncodePipeline
from laion_vq.encode.shard import CodeSpec
from laion_vq.shards.storage import StorageLayout
from laion_vq.shards.tar_reader import iter_samples
from laion_vq.vqgan import DEFAULT_MODEL, MODELS, VQGANEncoder, get_model_config
from laion_vq.vqgan.reference import TamingReference, sample_photos

#: the last commit whose encode stage was the spine's sequential one
SPINE_COMMIT = "4e586f5"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_jpegs(n: int, size: int, seed: int) -> list[bytes]:
    """Real photos, randomly cropped, flipped and resized to the encoder's input, JPEG q95 (img2dataset's)."""
    rng = np.random.default_rng(seed)
    photos = sample_photos(6, 512)
    out = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        side = int(rng.integers(256, 512))
        top, left = rng.integers(0, 512 - side + 1, size=2)
        crop = Image.fromarray(img[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def write_shards(layout: StorageLayout, shards: int, per_shard: int, size: int) -> None:
    os.makedirs(layout.images_dir(), exist_ok=True)
    for shard in range(shards):
        keys = [f"{shard:05d}{i:04d}" for i in range(per_shard)]
        with tarfile.open(layout.image_tar(shard), "w") as tar:
            for key, jpeg in zip(keys, make_jpegs(per_shard, size, seed=shard), strict=True):
                for ext, payload in (("jpg", jpeg), ("txt", b"a caption"), ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        status = pa.table({"key": keys, "status": ["success"] * per_shard, "caption": keys, "url": keys})
        pq.write_table(status, layout.image_status(shard))


def read_codes(path: str, grid: int) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=["key", "code"])
    codes = table.column("code").to_pylist()
    return {
        k: np.frombuffer(c, np.int16).reshape(grid, grid)
        for k, c in zip(table.column("key").to_pylist(), codes, strict=True)
    }


# -- (a) seed style ---------------------------------------------------------------------------------------------


class _TarImages(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[str, bytes]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        key, data = self.items[i]
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        return key, torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1


def seed_style(layout: StorageLayout, shards: int, reference: TamingReference, batch: int, workers: int, device: str):
    def run() -> dict[str, np.ndarray]:
        out = {}
        for shard in range(shards):
            items = [(s.key, s.image) for s in iter_samples(layout.image_tar(shard)) if s.image]
            loader = torch.utils.data.DataLoader(
                _TarImages(items), batch_size=batch, num_workers=workers, pin_memory=device.startswith("cuda")
            )
            keys, codes = [], []
            with torch.no_grad():
                for batch_keys, x in loader:
                    h = reference.encode_to_prequant(x.to(device))
                    _zq, _loss, (_, _, ind) = reference.quantize(h)  # GumbelVQ.encode's full quantizer forward
                    keys.extend(batch_keys)
                    codes.append(ind.reshape(len(batch_keys), -1).to(torch.int16).cpu().numpy())
            flat = np.concatenate(codes)
            table = pa.table({"key": keys, "code": [c.tobytes() for c in flat]})
            dest = layout.code_shard("seed_style", shard)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            pq.write_table(table, dest)
            out.update(read_codes(dest, int(np.sqrt(flat.shape[1]))))
        return out

    return run


# -- (b) the spine's stage --------------------------------------------------------------------------------------


def spine_stage() -> types.ModuleType:
    """`laion_vq/stages/codes.py` as it was at SPINE_COMMIT (its one moved import pointed at today's home)."""
    source = subprocess.run(
        ["git", "-C", REPO, "show", f"{SPINE_COMMIT}:laion_vq/stages/codes.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    source = source.replace("from laion_vq.stages.upstream import", "from laion_vq.shards.storage import")
    module = types.ModuleType("spine_codes_stage")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{SPINE_COMMIT}:laion_vq/stages/codes.py", "exec"), module.__dict__)
    return module


# -- fast mode's compile, cold and warm, each in a fresh process --------------------------------------------------

_COMPILE = """
import json, sys, torch
from laion_vq.encode.engine import ModelEngine
from laion_vq.vqgan import VQGANEncoder, get_model_config
model = VQGANEncoder(get_model_config(sys.argv[1])).eval().to(sys.argv[3])
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
engine = ModelEngine(model, mode="fast", batch_size=int(sys.argv[5]), compile_cache_dir=sys.argv[4])
size = model.config.resolution
engine.encode(torch.zeros((int(sys.argv[5]), size, size, 3), dtype=torch.uint8))
print(json.dumps({"compile_seconds": engine.stats.compile_seconds}))
"""


def compile_seconds(model_name: str, weights: str, device: str, cache: str, batch: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE, model_name, weights, device, cache, str(batch)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["compile_seconds"]


def best_of(repeats: int, fn: Callable[[], dict]) -> tuple[float, dict]:
    best, out = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=4, help="0: the engine's choice (free GPU memory)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="seed style's DataLoader workers")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default="exact,fast")
    parser.add_argument("--skip-compile-timing", action="store_true")
    args = parser.parse_args()

    config = get_model_config(args.model)
    size, grid, device = config.resolution, config.code_grid(config.resolution), args.device
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    model = VQGANEncoder(config).eval().to(device)
    reference = TamingReference(config).eval().to(device)
    reference.load_state_dict(model.state_dict())
    modes = [m for m in args.modes.split(",") if m]
    total = args.shards * args.images
    rows: list[tuple[str, float, float | None, float | None]] = []  # name, e2e img/s, model img/s, MiB/img
    outputs: dict[str, dict[str, np.ndarray]] = {}
    notes: list[str] = []

    with tempfile.TemporaryDirectory() as root:
        layout = StorageLayout(root)
        write_shards(layout, args.shards, args.images, size)
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in make_jpegs(16, size, 99)])
        on_device = torch.from_numpy(decoded).to(device)
        batch = args.batch_size or 4

        # (a)
        seconds, outputs["a"] = best_of(
            args.repeats, seed_style(layout, args.shards, reference, batch, args.workers, device)
        )
        x = on_device[:batch].permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            reference.quantize(reference.encode_to_prequant(x))
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(2):
                reference.quantize(reference.encode_to_prequant(x))
            if cuda:
                torch.cuda.synchronize()
        rows.append(
            (
                "(a) seed style: PIL DataLoader -> taming fp32",
                total / seconds,
                2 * batch / (time.perf_counter() - t0),
                None,
            )
        )

        # (b)
        spine = spine_stage()

        def run_spine() -> dict:
            out = {}
            for shard in range(args.shards):
                result = spine.encode_code_shard(
                    layout,
                    shard,
                    model_name=args.model,
                    codes_name="spine",
                    encode=lambda b, _k: model.encode_uint8(b, batch_size=batch),
                    grid=grid,
                    n_embed=config.n_embed,
                    image_size=size,
                    batch_size=batch,
                    replace_other_versions=True,
                )
                out.update(read_codes(result.path, grid))
            return out

        seconds, outputs["b"] = best_of(args.repeats, run_spine)
        rows.append((f"(b) spine stage @{SPINE_COMMIT}: sequential", total / seconds, None, None))

        # (c)
        weights = os.path.join(root, "weights.pt")
        torch.save(model.state_dict(), weights)
        for mode in modes:
            engine = ModelEngine(
                model, mode=mode, batch_size=args.batch_size, compile_cache_dir=os.path.join(root, "inductor")
            )
            engine.encode(decoded[: engine.batch_size])  # compile / warm up outside the timing
            if mode == "fast":
                notes.append(f"fast: first forward (compile, this process) {engine.stats.compile_seconds:.1f}s")
            spec = CodeSpec(model_name=args.model, grid=grid, n_embed=config.n_embed, image_size=size, codes_name=mode)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()

            def run_pipeline(engine: ModelEngine = engine, spec: CodeSpec = spec) -> dict:
                with ImageDecoder(size, device) as decoder:
                    results = dict(EncodePipeline(layout, spec, engine, decoder).run(range(args.shards)))
                out = {}
                for result in results.values():
                    if isinstance(result, BaseException):
                        raise result
                    out.update(read_codes(result.path, grid))
                return out

            seconds, outputs[mode] = best_of(args.repeats, run_pipeline)
            mib = None
            if cuda:
                mib = (torch.cuda.max_memory_allocated() - base) / engine.batch_size / 2**20
            reps = max(2, 64 // engine.batch_size) if cuda else 2
            engine.encode(on_device[: engine.batch_size])
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                pending = engine.submit(on_device[: engine.batch_size])
            pending.result()
            model_ips = reps * engine.batch_size / (time.perf_counter() - t0)
            rows.append((f"(c) pipeline, {mode} (batch {engine.batch_size})", total / seconds, model_ips, mib))
            if mode == "fast" and not args.skip_compile_timing:
                cache = os.path.join(root, "inductor-fresh")
                cold = compile_seconds(args.model, weights, device, cache, engine.batch_size)
                warm = compile_seconds(args.model, weights, device, cache, engine.batch_size)
                notes.append(f"fast: compile in a fresh process, cold cache {cold:.1f}s, warm cache {warm:.1f}s")
            engine.release()

    a_ips = rows[0][1]
    a_model = rows[0][2]
    print(
        f"model={args.model} device={device} ({torch.cuda.get_device_name() if cuda else 'CPU'}) "
        f"torch={torch.__version__} shards={args.shards} images/shard={args.images} threads={torch.get_num_threads()}"
    )
    print(f"{'path':58s} {'end-to-end img/s':>16s} {'ratio to (a)':>12s} {'model-only img/s':>16s} {'MiB/img':>8s}")
    for name, ips, row_model_ips, row_mib in rows:
        m = f"{row_model_ips:16.2f}" if row_model_ips else f"{'':16s}"
        print(f"{name:58s} {ips:16.2f} {ips / a_ips:12.2f} {m} {'' if row_mib is None else f'{row_mib:8.0f}'}")
    if a_model:
        for name, _ips, row_model_ips, _mib in rows[2:]:
            assert row_model_ips is not None  # the (c) rows all time the model alone
            print(f"model-only ratio {name} / (a): {row_model_ips / a_model:.2f}")
    keys = sorted(outputs["b"])
    exact = outputs.get("exact")
    if exact is not None:
        same = all(np.array_equal(exact[k], outputs["b"][k]) for k in keys)
        print(f"(c) exact codes identical to (b) on every image: {same}")
        if "fast" in outputs:
            agree = np.mean([np.mean(outputs["fast"][k] == exact[k]) for k in keys])
            print(f"fast vs exact: {agree:.4%} of code positions agree (random weights: pessimistic)")
        seed = np.mean([np.mean(outputs["a"][k] == exact[k]) for k in keys])
        print(f"(a) vs exact: {seed:.4%} agree ((a) samples codes with Gumbel noise, as taming's forward does)")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
