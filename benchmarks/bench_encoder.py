"""Throughput of our VQGAN encoder vs the taming-transformers reference, on the same weights and photos.

Both models get the SAME seeded random weights (no checkpoint download needed) and encode the same
real photos from scikit-image. The reference is taming's Encoder + quant_conv + the deterministic
quantizer (argmax of the Gumbel logits / VectorQuantizer2's argmin); ours is ``VQGANEncoder``
through ``encode_uint8`` (uint8 in, int16 codes out, so preprocessing is included for both).

    python benchmarks/bench_encoder.py                       # CPU, full f8, 4 images, batch 2
    python benchmarks/bench_encoder.py --device cuda --images 256 --batch-size 64 --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch

from laion_vq.vqgan import DEFAULT_MODEL, MODELS, VQGANEncoder, get_model_config, preprocess
from laion_vq.vqgan.reference import TamingReference, sample_photos

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(
    fns: dict[str, Callable[[], np.ndarray]], device: torch.device, repeats: int
) -> dict[str, tuple[float, np.ndarray]]:
    """Best wall time per function over ``repeats`` rounds, alternating them so drift hits both alike."""
    results: dict[str, tuple[float, np.ndarray]] = {name: (float("inf"), np.empty(0)) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            out = fn()
            _sync(device)
            results[name] = (min(results[name][0], time.perf_counter() - start), out)
    return results


def _reference_encode(
    ref: TamingReference, images: np.ndarray, batch_size: int, device: torch.device, dtype: torch.dtype | None
) -> np.ndarray:
    """What a straightforward taming-based pipeline does: float preprocessing, then the reference."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = preprocess(torch.from_numpy(images[start : start + batch_size]).to(device))
            ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with ctx:
                h = ref.encode_to_prequant(x)
            with torch.autocast(device.type, enabled=False):
                h = h.float()
                if ref.config.quantizer == "gumbel":
                    codes = torch.argmax(ref.quantize.proj(h), dim=1)
                else:
                    codes = ref.quantize(h)[2][2]
            out.append(codes.to(torch.int16).cpu().numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; the best per model is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-size", type=int, default=None, help="image side (LAION_VQ_IMAGE_SIZE); default the model's 256"
    )
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    config = get_model_config(args.model)

    torch.manual_seed(args.seed)
    ref = TamingReference(config).eval().to(device)
    ours = VQGANEncoder(config).eval()
    ours.load_state_dict(ref.state_dict())
    ours.to(device)
    images = sample_photos(args.images, args.image_size or config.resolution)

    print(
        f"model={config.name} device={device} dtype={args.dtype} images={args.images} "
        f"size={images.shape[1]} grid={config.code_grid(images.shape[1])} "
        f"batch={args.batch_size} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")

    def run_ours() -> np.ndarray:
        return ours.encode_uint8(images, batch_size=args.batch_size, dtype=dtype)

    def run_ref() -> np.ndarray:
        return _reference_encode(ref, images, args.batch_size, device, dtype)

    # Warm-up on one batch each (kernel selection, allocator, lazy init), then time the full set.
    ours.encode_uint8(images[: args.batch_size], batch_size=args.batch_size, dtype=dtype)
    _reference_encode(ref, images[: args.batch_size], args.batch_size, device, dtype)
    timed = _time_interleaved({"ref": run_ref, "ours": run_ours}, device, args.repeats)
    (t_ref, codes_ref), (t_ours, codes_ours) = timed["ref"], timed["ours"]

    ips_ref, ips_ours = args.images / t_ref, args.images / t_ours
    print(f"reference (taming): {ips_ref:8.2f} img/s  ({t_ref:.2f} s)")
    print(f"ours (laion_vq)   : {ips_ours:8.2f} img/s  ({t_ours:.2f} s)")
    print(f"ratio ours/ref    : {ips_ours / ips_ref:8.3f}x")
    print(f"codes equal       : {(codes_ours == codes_ref).mean():.6f} of {codes_ref.size} positions")


if __name__ == "__main__":
    main()
