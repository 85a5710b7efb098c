"""JPEG decode throughput (PIL single thread, PIL over threads and over processes, torchvision's libjpeg-turbo,
nvJPEG batched where CUDA is present) and what a decoder other than PIL changes: pixels, and VQGAN codes.

The JPEGs are what img2dataset writes: random crops of scikit-image's photos (random side, position, flip and
resampling filter), resized to SIZE² and encoded at quality 95 with OpenCV (img2dataset's encoder; PIL when
OpenCV is missing), 4:2:0 chroma. Codes come from a ``VQGANEncoder`` with seeded random weights (``--model``,
tiny by default) or a checkpoint (``--checkpoint``); the same decode encoded twice gives the noise floor, and
a PIL decode with ±1 on a fraction of its values (``--proxy-noise``) shows how sensitive the codes are to
decoder-sized differences where no GPU is at hand (a proxy, NOT nvJPEG).

    python benchmarks/bench_jpeg_decode.py                                   # CPU, 200 JPEGs, tiny model
    python benchmarks/bench_jpeg_decode.py --model vqgan_gumbel_f8 --code-images 4
    python benchmarks/bench_jpeg_decode.py --device cuda --images 2000 --batch-size 256
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from laion_vq.encode.decode import ImageDecoder, safe_decode, torchvision_decode
from laion_vq.vqgan import MODELS, VQGANEncoder, get_model_config, load_encoder
from laion_vq.vqgan.reference import PHOTO_NAMES

RESAMPLE = (Image.Resampling.BICUBIC, Image.Resampling.LANCZOS, Image.Resampling.BILINEAR, Image.Resampling.BOX)


def make_jpegs(n: int, size: int, quality: int, seed: int, writer: str) -> list[tuple[str, bytes]]:
    """``n`` img2dataset-like JPEGs from random crops of the bundled scikit-image photos."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTO_NAMES]
    photos = [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]
    out = []
    for i in range(n):
        photo = photos[rng.integers(len(photos))][..., :3]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        img = Image.fromarray(photo[top : top + side, left : left + side])
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img.resize((size, size), RESAMPLE[rng.integers(len(RESAMPLE))]))
        if writer == "cv2":
            import cv2

            ok, buf = cv2.imencode(".jpg", arr[..., ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), quality])
            assert ok
            data = buf.tobytes()
        else:
            b = io.BytesIO()
            Image.fromarray(arr).save(b, "JPEG", quality=quality)
            data = b.getvalue()
        out.append((f"{i:09d}", data))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def time_best(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best wall time per function over ``repeats`` rounds, interleaved so drift hits all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def pixel_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "images differing": float((diff.reshape(len(diff), -1).max(1) > 0).mean()),
        "pixels differing": float((diff.max(-1) > 0).mean()),
        "values differing": float((diff > 0).mean()),
        "mean abs diff": float(diff.mean()),
        "max abs diff": float(diff.max()),
    }


def code_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    changed = a != b
    return {
        "code positions changed": float(changed.mean()),
        "images with any code changed": float(changed.reshape(len(changed), -1).any(1).mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--writer", choices=["cv2", "pil"], default=None, help="JPEG encoder (default: cv2 if present)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads/processes (default: cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per decode() call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the best is reported")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", default="vqgan_gumbel_f8_tiny", choices=sorted(MODELS))
    parser.add_argument("--checkpoint", default=None, help="encoder weights (default: seeded random weights)")
    parser.add_argument(
        "--code-images", type=int, default=None, help="images encoded (default: all on CUDA; on CPU 32, 4 if not tiny)"
    )
    parser.add_argument("--proxy-noise", type=float, default=0.25, help="fraction of values given ±1 (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    writer = args.writer
    if writer is None:
        try:
            import cv2  # noqa: F401

            writer = "cv2"
        except ImportError:
            writer = "pil"
    items = make_jpegs(args.images, args.size, args.quality, args.seed, writer)
    chunks = _chunks(items, args.batch_size)
    n, s = len(items), args.size
    mb = sum(len(d) for _, d in items) / 1e6
    print(
        f"images={n} size={s} quality={args.quality} writer={writer} ({mb / n * 1000:.1f} kB/JPEG) "
        f"batch={args.batch_size} workers={args.workers} cores={os.cpu_count()} torch={torch.__version__} "
        f"device={device} loadavg={os.getloadavg()[0]:.1f}"
        + (f" gpu={torch.cuda.get_device_name(device)}" if cuda else "")
    )

    # ---- throughput
    tv_cpu = torchvision_decode("cpu")
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in items]
    threads = ImageDecoder(s, cpu_workers=args.workers)
    procs = ImageDecoder(s, cpu_workers=args.workers, cpu_pool="process")
    routed_cpu = ImageDecoder(s, cpu_workers=1, gpu_decode=tv_cpu)
    procs.decode(chunks[0])  # start the worker processes outside the timing
    fns: dict[str, Callable[[], object]] = {
        "PIL, 1 thread (safe_decode loop)": lambda: [safe_decode(item, s) for item in items],
        f"PIL, {args.workers} threads (ImageDecoder)": lambda: [threads.decode(c) for c in chunks],
        f"PIL, {args.workers} processes (ImageDecoder)": lambda: [procs.decode(c) for c in chunks],
        "torchvision decode_jpeg CPU, batched": lambda: [tv_cpu(c) for c in _chunks(tensors, args.batch_size)],
        "ImageDecoder batched path, torchvision CPU": lambda: [routed_cpu.decode(c) for c in chunks],
    }
    gpu = None
    if cuda:
        nvjpeg = torchvision_decode(device)
        gpu = ImageDecoder(s, device, cpu_workers=args.workers)
        for c in _chunks(tensors, args.batch_size)[:2]:  # nvJPEG handle, buffers, kernels
            nvjpeg(c)
        gpu.decode(chunks[0])
        fns["nvJPEG decode_jpeg(cuda), batched"] = lambda: [nvjpeg(c) for c in _chunks(tensors, args.batch_size)]
        fns["ImageDecoder(cuda): nvJPEG + routing + fallbacks"] = lambda: [gpu.decode(c) for c in chunks]
    timed = time_best(fns, args.repeats, device)
    base = timed["PIL, 1 thread (safe_decode loop)"]
    print(f"\n{'decoder':52s} {'img/s':>9s} {'seconds':>8s} {'vs PIL x1':>9s}")
    for name, sec in timed.items():
        print(f"{name:52s} {n / sec:9.0f} {sec:8.3f} {base / sec:8.2f}x")
    t_thr = timed[f"PIL, {args.workers} threads (ImageDecoder)"]
    t_proc = timed[f"PIL, {args.workers} processes (ImageDecoder)"]
    print(
        f"ratio threads/processes (img/s): {t_proc / t_thr:.2f}x -> "
        f"{'threads' if t_thr <= t_proc else 'processes'} faster with {args.workers} workers on {os.cpu_count()} cores"
    )
    if cuda:
        print(f"ratio nvJPEG (ImageDecoder) / PIL threads: {t_thr / timed[list(fns)[-1]]:.2f}x")

    # ---- pixels: each decoder vs PIL
    pil_images = [img for _, img, _, _ in (safe_decode(item, s) for item in items) if img is not None]
    assert len(pil_images) == len(items), "PIL could not decode every benchmark image"
    pil = np.stack(pil_images)
    decodes = {"torchvision CPU (libjpeg-turbo)": np.stack([t.permute(1, 2, 0).numpy() for t in tv_cpu(tensors)])}
    if cuda:
        out = [t.permute(1, 2, 0).cpu().numpy() for c in _chunks(tensors, args.batch_size) for t in nvjpeg(c)]
        decodes["nvJPEG (cuda)"] = np.stack(out)
        assert gpu is not None  # made above when cuda
        via = [gpu.decode(c) for c in chunks]
        decodes["ImageDecoder(cuda)"] = np.concatenate([b.images.cpu().numpy() for b in via])
        fallbacks = sum((sum(b.cpu_fallbacks.values()) for b in via), 0)
        print(f"\nImageDecoder(cuda): {sum(b.gpu_decoded for b in via)} on the GPU, {fallbacks} CPU fallbacks")
    rng = np.random.default_rng(args.seed + 1)
    if args.proxy_noise > 0:
        flip = rng.random(pil.shape) < args.proxy_noise
        sign = rng.choice(np.array([-1, 1], np.int16), pil.shape)
        noisy = np.clip(pil.astype(np.int16) + flip * sign, 0, 255).astype(np.uint8)
        decodes[f"PROXY: PIL ±1 on {args.proxy_noise:.0%} of values"] = noisy
    stats = {name: pixel_stats(arr, pil) for name, arr in decodes.items()}
    cols = list(next(iter(stats.values())))
    print(f"\n{'vs PIL, ' + str(n) + ' JPEGs':42s} " + " ".join(f"{c:>17s}" for c in cols))
    for name, st in stats.items():
        print(f"{name:42s} " + " ".join(f"{st[c]:17.4g}" for c in cols))

    # ---- codes
    config = get_model_config(args.model)
    k = args.code_images or (n if cuda else 32 if args.model.endswith("_tiny") else 4)
    k = min(k, n)
    if args.checkpoint:
        encoder = load_encoder(config, args.checkpoint, device)
        weights = args.checkpoint
    else:
        torch.manual_seed(args.seed)
        encoder = VQGANEncoder(config).eval().to(device)
        weights = f"random (seed {args.seed})"
    start = time.perf_counter()
    ref = encoder.encode_uint8(pil[:k], batch_size=16)
    per_image = (time.perf_counter() - start) / k
    print(f"\ncodes: model={config.name} weights={weights} images={k} ({per_image:.3f} s/image on {device})")
    rows = {"same PIL decode again (noise floor)": encoder.encode_uint8(pil[:k], batch_size=16)}
    for name, arr in decodes.items():
        rows[name] = encoder.encode_uint8(np.ascontiguousarray(arr[:k]), batch_size=16)
    print(f"{'vs codes of the PIL decode':42s} {'code positions changed':>24s} {'images with any change':>24s}")
    for name, codes in rows.items():
        st = code_stats(codes, ref)
        print(
            f"{name:42s} {st['code positions changed']:24.4%} {st['images with any code changed']:24.1%}"
            f"   ({int((codes != ref).sum())} of {ref.size})"
        )
    for dec in (threads, procs, routed_cpu, gpu):
        if dec is not None:
            dec.close()


if __name__ == "__main__":
    main()
