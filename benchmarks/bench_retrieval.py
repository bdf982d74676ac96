"""Benchmark exact retrieval (TARGETS.md P4: COCO-test size, 5k images x 25k captions).

    python benchmarks/bench_retrieval.py            # 5000 x 25000 at d = 256 and 1024, CPU (+ CUDA if present)
    python benchmarks/bench_retrieval.py --small    # 1000 x 5000, a few seconds
    python benchmarks/bench_retrieval.py --dims 2304 --backends torch

Prints seconds per backend and checks that all backends return identical per-query counts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from repblend.stages.retrieval import faiss_available, recalls_from_counts, retrieval_counts


def make_data(n_img: int, caps_per_image: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, d), dtype=np.float32)
    c2i = rng.permutation(np.repeat(np.arange(n_img), caps_per_image))
    # captions: noisy copies of their image (cosine ~3/sqrt(d), a few sigma above chance), so recalls are
    # neither 0 nor 100
    noise = np.float32(np.sqrt(d) / 3.0)
    txt = img[c2i] + noise * rng.standard_normal((len(c2i), d), dtype=np.float32)
    return torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(c2i)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1000 images x 5000 captions (quick check)")
    ap.add_argument("--n-img", type=int, default=5000)
    ap.add_argument("--caps-per-image", type=int, default=5)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--backends", nargs="+", default=["torch", "faiss"], choices=["torch", "faiss"])
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per cell (best is reported)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n_img = 1000 if args.small else args.n_img
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    backends = [b for b in args.backends if b != "faiss" or faiss_available()]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; images {n_img}, "
          f"captions {n_img * args.caps_per_image}")
    print(f"{'device':6} {'d':>5} {'backend':8} {'seconds':>8} {'r_mean':>8}  identical")
    all_equal = True
    for d in args.dims:
        img, txt, c2i = make_data(n_img, args.caps_per_image, d)
        for dev in devices:
            ref = None
            for backend in backends:
                if dev == "cuda" and backend == "faiss" and not faiss_available(gpu=True):
                    continue  # faiss-cpu on CUDA tensors would only time the copy to the CPU
                x, y = img.to(dev), txt.to(dev)
                retrieval_counts(x[:64], y[:320], torch.arange(320) % 64, 10, backend)  # warm-up (kernels, imports)
                best = float("inf")
                for _ in range(args.repeats):
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    counts = retrieval_counts(x, y, c2i, 10, backend)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
                r_mean = recalls_from_counts(*counts)["r_mean"]
                if ref is None:
                    ref, same = counts, "(reference)"
                else:
                    diff = int((ref[0] != counts[0]).sum() + (ref[1] != counts[1]).sum())
                    same = "yes" if diff == 0 else f"NO ({diff} queries differ)"
                    all_equal &= diff == 0
                print(f"{dev:6} {d:>5} {backend:8} {best:8.3f} {r_mean:8.3f}  {same}", flush=True)
    print("all backends identical" if all_equal else "BACKENDS DIFFER")


if __name__ == "__main__":
    main()
