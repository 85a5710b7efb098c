"""What the `sample` index rule costs: per-image Gumbel noise, and encode throughput `sample` vs `argmax`.

Same weights, same images, same run; the noise is ``n_embed × grid × grid`` values per image (8.4M for f8).

    python benchmarks/bench_index_rules.py                            # CPU, tiny model, 4 images
    python benchmarks/bench_index_rules.py --model vqgan_gumbel_f8 --device cuda --images 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from laion_vq.vqgan import MODELS, VQGANEncoder, get_model_config
from laion_vq.vqgan.sampling import gumbel_noise, key_seed


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vqgan_gumbel_f8_tiny", choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = get_model_config(args.model)
    grid = config.code_grid(config.resolution)
    shape = (config.n_embed, grid, grid)
    noise_s = _timed(lambda: gumbel_noise(key_seed("000000000"), shape, args.device), args.repeats)
    torch.manual_seed(0)
    model = VQGANEncoder(config).eval().to(args.device)
    size = config.resolution
    images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    keys = [f"{i:09d}" for i in range(args.images)]
    per_rule = {
        rule: _timed(
            lambda rule=rule: model.encode_uint8(images, batch_size=args.batch_size, index_rule=rule, keys=keys),
            args.repeats,
        )
        / args.images
        for rule in ("argmax", "sample")
    }
    print(f"{args.model} on {args.device}, torch threads {torch.get_num_threads()}")
    print(f"gumbel noise {shape} per image: {noise_s * 1e3:.1f} ms")
    for rule, seconds in per_rule.items():
        print(f"encode_uint8 index_rule={rule}: {seconds * 1e3:.1f} ms/image ({1 / seconds:.1f} images/s)")
    print(f"sample / argmax: {per_rule['sample'] / per_rule['argmax']:.2f}x")


if __name__ == "__main__":
    main()
