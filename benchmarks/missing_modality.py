"""Missing-modality retrieval on cached real features: zero-fill vs mean-fill vs EBR substitution.

    python benchmarks/missing_modality.py                      # Flickr8k (configs/flickr8k_100.yaml's cache)
    python benchmarks/missing_modality.py --small              # a few seconds: 300 train images, 3 epochs
    python benchmarks/missing_modality.py --config configs/coco_100.yaml data.root=...   # any config + overrides

The feature cache is the one `repblend encode --config ...` builds (reused when up to date, encoded if missing).

Heads (plain, and with EBR) are trained on real training pairs (CLIP loss, cosine schedule), the EBR
substitution ranking comes from images held out of the training split (never the reported split), and
fused-item retrieval on the eval split is measured with a fraction of the items missing their image or
their attached caption (see stages/missing.py for the scenario). Prints one table per missing side:
r_mean per (model, fill) and missing rate, mean over training seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from repblend.pipeline import steps
from repblend.pipeline.config import load_config
from repblend.stages.ebr import EBRSettings
from repblend.stages.evaluate import PairSet, TrainSettings, retrieval_of, train_heads
from repblend.stages.missing import SIDES, missing_modality_recall, substitution_ranking


def split_images(features, n_val: int, n_train: int, seed: int):
    """Seeded (train pairs, val features) from one training split: images are disjoint."""
    order = torch.randperm(features.num_images, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:n_val + n_train] if n_train else order[n_val:]
    return _subset(features, train), _subset(features, val)


def _subset(features, images: torch.Tensor):
    keep = torch.isin(features.caption_to_image, images)
    remap = torch.full((features.num_images,), -1, dtype=torch.long)
    remap[images] = torch.arange(len(images))
    return features.image_features[images], features.text_features[keep], remap[features.caption_to_image[keep]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/flickr8k_100.yaml", help="its data and encoders pick the cache")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    default=["data.root=../shared/data/flickr8k"], help="config overrides")
    ap.add_argument("--small", action="store_true", help="300 train images, 3 epochs, 1 seed")
    ap.add_argument("--train-images", type=int, default=2000, help="training images (5 captions each); 0 = all")
    ap.add_argument("--val-images", type=int, default=300, help="held out of train for the substitution ranking")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--embed-dim", type=int, default=512)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--shared-dim", type=int, default=256)
    ap.add_argument("--residual", action="store_true", help="the residual adapter (ebr.residual: f + h^-1(g))")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.15, 0.3, 0.5, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.small:
        args.train_images, args.epochs, args.seeds = 300, 3, 1
    torch.set_num_threads(args.threads)
    config = load_config(args.config, [*args.overrides, "run.progress=false"])
    caches = steps.encode(config)
    train_cache, eval_cache = caches[config.data.train_split], caches[config.data.eval_split]
    train_all, evalset = train_cache.load(), eval_cache.load()
    (img, txt, c2i), val = split_images(train_all, args.val_images, args.train_images, seed=0)
    pairs = PairSet(img[c2i], txt, None, args.lr, args.lr)
    ev = (evalset.image_features, evalset.text_features, evalset.caption_to_image)
    print(f"train {len(img)} images / {len(txt)} pairs ({train_cache.tensors_path.name}), val {len(val[0])} images, "
          f"eval {evalset.num_images} images ({eval_cache.tensors_path.name}); {args.epochs} epochs, lr {args.lr}")
    ebr = EBRSettings(alpha=args.alpha, hidden=args.hidden, shared_dim=args.shared_dim, residual=args.residual)
    cpu = torch.device("cpu")
    rows: dict[tuple[str, str, str], list[float]] = {}
    plain_recall: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for name, settings in (("plain", None), ("ebr", ebr)):
            start = time.perf_counter()
            ts = TrainSettings(embed_dim=args.embed_dim, epochs=args.epochs, loss="clip", schedule="cosine",
                               ebr=settings)
            model = train_heads(pairs, ts, seed, cpu)
            plain_recall.setdefault(name, []).append(retrieval_of(model, *ev, cpu)["r_mean"])
            order = None
            if settings is not None:
                sim, order = substitution_ranking(model, *val)
                print(f"  seed {seed} ebr: mean code cosine image-text on val {float(sim[0, 1]):.3f}")
            for side in SIDES:
                for fill in ("zero", "mean") + (("ebr",) if settings else ()):
                    for rate in args.rates:
                        r = missing_modality_recall(model, *ev, missing=side, rate=rate, fill=fill, seed=1, order=order)
                        rows.setdefault((side, name, fill), []).append(r["r_mean"])
            print(f"  seed {seed} {name}: trained and measured in {time.perf_counter() - start:.1f} s; "
                  f"cross-modal r_mean {plain_recall[name][-1]:.2f}")
    print("\nCross-modal retrieval r_mean on the eval split (no modality missing): "
          + ", ".join(f"{k} {statistics.fmean(v):.2f}" for k, v in plain_recall.items()))
    n_rates = len(args.rates)
    for side in SIDES:
        print(f"\nFused-item retrieval r_mean, {side} missing, mean over {args.seeds} training seed(s)")
        print("| model | fill | " + " | ".join(f"p={r:g}" for r in args.rates) + " |")
        print("|---|---|" + "---|" * n_rates)
        for (s, name, fill), values in rows.items():
            if s != side:
                continue
            per_rate = [statistics.fmean(values[i::n_rates]) for i in range(n_rates)]
            print(f"| {name} | {fill} | " + " | ".join(f"{v:.2f}" for v in per_rate) + " |")


if __name__ == "__main__":
    main()
