"""Exact image-text retrieval metrics (ALGORITHMS.md section 5, TARGETS.md P4).

Metrics
-------
Embeddings are L2-normalised here and scored by cosine similarity (inner product).

* IR@K (text -> image, key ``img_r{K}``): a caption is a hit if its own image is among its top K images.
* TR@K (image -> text, key ``txt_r{K}``): an image is a hit if ANY of its captions is among its top K captions.
* ``r_mean``: the mean of all reported recalls. Values are percentages.

Ties (the rule both backends implement)
---------------------------------------
Optimistic ranking: the rank of the ground truth (GT) is the number of database items scored STRICTLY
higher than the best GT item, and a query is a hit at K iff that number is < K. For IR the GT score is the
caption's score with its own image; for TR it is the maximum over the image's captions (so other GT
captions never count against it). The result does not depend on the order in which a top-k search breaks
ties. Every comparison uses scores from ONE computation of the score matrix (the GT score is read out of the
same GEMM output as the scores it is compared with, never recomputed by another kernel whose rounding could
differ by an ulp), so ties are resolved exactly with respect to the computed float32 scores.

Only ``count = min(#strictly higher, max_k)`` is needed (hit@K <=> count < K for K <= max_k), and it follows
from the top-``max_k`` score VALUES alone, which are unique even when the items achieving them are not:
``#strictly higher >= K  <=>  v_K > gt_score`` where ``v_K`` is the K-th largest score of the query.

Backends
--------
``torch`` (default, CPU and CUDA): the image x caption score matrix is computed once (one GEMM in total), in
blocks of image rows. TR is exact within each block (rows are complete). For IR, each caption's own-image
score is read from the block holding its image; then, if the whole matrix fits in ``max_matrix_bytes``
(default 1 GiB; COCO-test is 0.5 GB), it is kept and the captions' columns are counted against their own
scores; otherwise each caption keeps a running top-``max_k`` of its column values across blocks and counts
those above its own score (memory O(block + max_k * n_captions)). Both give the same counts.

``faiss`` (exact ``IndexFlatIP``; GPU index if faiss-gpu is importable and the tensors are on CUDA): two
searches (captions over images, images over captions) with ``k = max_k + 1``. If a GT item is returned at
position p, its score is ``D[p]`` from the same search and ``count = #{j < p : D[j] > D[p]}`` (exact: all
strictly higher items precede it). If no GT item is returned, the GT score is <= ``D[max_k]``; when
``D[max_k] < D[max_k - 1]`` the count is certainly >= max_k. Only when ``D[max_k] == D[max_k - 1]`` (a tie
at the boundary that could include an unreturned GT item) the query is recomputed exactly from one full row
of scores with torch. So faiss results follow the same rule exactly with respect to ITS scores.

The two backends use different GEMM kernels; they agree exactly whenever those produce the same float32
scores (e.g. for exactly representable data, as in the tests) and can differ only on pairs of scores within
an ulp of each other. Measured on the 2-core CPU at COCO-test size (5000 x 25000, ``benchmarks/bench_retrieval.py``),
faiss-cpu takes 0.47 s at d = 256 and 1.53 s at d = 1024 against torch's 0.42 s and 1.06 s (two searches against
torch's single GEMM), so ``backend="auto"`` is torch.
On CUDA it is torch as well: one cuBLAS GEMM whose precision this module controls (below), while faiss-gpu
would need host round trips in this code and was not measured; ``backend="faiss"`` still uses it if installed.

The torch matmuls run in full IEEE float32 even if TF32 (CUDA) or bf16 (oneDNN on CPU) matmul precision
was enabled globally (the setting is restored afterwards): reduced precision would create spurious ties.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["retrieval_metrics", "retrieval_counts", "recalls_from_counts", "auto_backend", "faiss_available"]

_BACKENDS = ("auto", "torch", "faiss")


# ---------------------------------------------------------------------------------------------- public API

class NonFiniteEmbeddings(ValueError):
    """Embeddings with NaN/inf: the model that produced them diverged."""


def retrieval_metrics(
    img_emb: Tensor | np.ndarray,
    txt_emb: Tensor | np.ndarray,
    caption_to_image: Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    backend: str = "auto",
    *,
    normalize: bool = True,
    block_size: int | None = None,
    max_matrix_bytes: int | None = None,
) -> dict[str, float]:
    """Recall@K in percent: ``img_r{K}`` (text->image), ``txt_r{K}`` (image->text) for K in ``ks``, and
    ``r_mean`` (their mean). See the module docstring for the tie rule and the backends.

    ``img_emb`` [n_img, d], ``txt_emb`` [n_cap, d], ``caption_to_image`` [n_cap] (the image of each
    caption; every image needs at least one caption). torch backend: ``block_size`` image rows per score
    block; the whole score matrix is kept if it fits in ``max_matrix_bytes`` (default 1 GiB), else IR streams
    a running top-k (see the module docstring).
    """
    ks = _check_ks(ks)
    ir_count, tr_count = retrieval_counts(
        img_emb, txt_emb, caption_to_image, max(ks), backend,
        normalize=normalize, block_size=block_size, max_matrix_bytes=max_matrix_bytes,
    )
    return recalls_from_counts(ir_count, tr_count, ks)


def recalls_from_counts(ir_count: Tensor, tr_count: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Turn capped strictly-higher counts into recall percentages (hit@K <=> count < K)."""
    ks = _check_ks(ks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"img_r{k}"] = float((ir_count < k).double().mean().item() * 100.0)
    for k in ks:
        out[f"txt_r{k}"] = float((tr_count < k).double().mean().item() * 100.0)
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


def retrieval_counts(
    img_emb: Tensor | np.ndarray,
    txt_emb: Tensor | np.ndarray,
    caption_to_image: Tensor | np.ndarray | Sequence[int],
    max_k: int,
    backend: str = "auto",
    *,
    normalize: bool = True,
    block_size: int | None = None,
    max_matrix_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per query, the number of database items scored strictly higher than the best GT item, capped at
    ``max_k`` (``max_k`` means ">= max_k").

    Returns ``(ir_count [n_cap], tr_count [n_img])`` as int64 CPU tensors.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"retrieval backend must be one of {_BACKENDS}, got {backend!r}")
    max_k = int(max_k)
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    img, txt, c2i = _prepare(img_emb, txt_emb, caption_to_image, normalize)
    if backend == "auto":
        backend = auto_backend(img.device)
    if backend == "faiss" and not faiss_available():
        raise ValueError("retrieval backend 'faiss' needs the faiss-cpu (or faiss-gpu) package, which is not installed")
    with _ieee_fp32_matmul(img.device):
        if backend == "torch":
            ir, tr = _counts_torch(img, txt, c2i, max_k, block_size, max_matrix_bytes)
        else:
            ir, tr = _counts_faiss(img, txt, c2i, max_k)
    return ir.cpu(), tr.cpu()


def faiss_available(gpu: bool = False) -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    if not gpu:
        return True
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def auto_backend(device: torch.device | str) -> str:
    """The backend ``"auto"`` resolves to: torch on every device (see the module docstring for why)."""
    torch.device(device)  # validates
    return "torch"


# ---------------------------------------------------------------------------------------------- helpers
def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"recall cut-offs must be positive integers, got {ks}")
    return ks


def _prepare(img_emb, txt_emb, caption_to_image, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    img = torch.as_tensor(img_emb)
    txt = torch.as_tensor(txt_emb)
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"retrieval needs img_emb [n_img, d] and txt_emb [n_cap, d], got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img.device != txt.device:
        raise ValueError(f"image embeddings on {img.device} but caption embeddings on {txt.device}")
    n_img, n_cap = img.shape[0], txt.shape[0]
    if n_img == 0 or n_cap == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {n_img} and {n_cap}")
    img = img.detach().float()
    txt = txt.detach().float()
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
        raise NonFiniteEmbeddings("retrieval embeddings contain NaN or inf")
    if normalize:
        img = F.normalize(img, dim=1)
        txt = F.normalize(txt, dim=1)
    img, txt = img.contiguous(), txt.contiguous()
    if not isinstance(caption_to_image, Tensor):
        caption_to_image = np.asarray(caption_to_image)
    c2i = torch.as_tensor(caption_to_image)
    if c2i.dim() != 1 or c2i.shape[0] != n_cap or c2i.dtype.is_floating_point or c2i.dtype == torch.bool:
        raise ValueError(
            f"caption_to_image must be an integer vector of length n_cap={n_cap}, got {c2i.dtype} {tuple(c2i.shape)}"
        )
    c2i = c2i.long().to(img.device)
    if int(c2i.min()) < 0 or int(c2i.max()) >= n_img:
        raise ValueError(f"caption_to_image has image ids outside [0, {n_img})")
    per_image = torch.bincount(c2i, minlength=n_img)
    if bool((per_image == 0).any()):
        missing = torch.nonzero(per_image == 0).flatten()[:5].tolist()
        raise ValueError(f"{int((per_image == 0).sum())} images have no caption (e.g. image ids {missing})")
    return img, txt, c2i


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Force full-precision float32 matmuls (no TF32/bf16 shortcuts) for exact scores; restore afterwards."""
    switches = []
    if device.type == "cuda":
        switches.append(torch.backends.cuda.matmul)
    else:
        mkldnn_matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        if mkldnn_matmul is not None:
            switches.append(mkldnn_matmul)
    changed = []
    for sw in switches:
        prev = getattr(sw, "fp32_precision", None)
        if prev is not None and prev not in ("ieee", "none"):
            sw.fp32_precision = "ieee"
            changed.append((sw, prev))
    legacy_tf32 = None
    if device.type == "cuda" and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch < 2.9
        legacy_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        for sw, prev in changed:
            sw.fp32_precision = prev
        if legacy_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = legacy_tf32


_DEFAULT_MAX_MATRIX_BYTES = 1 << 30  # keep the whole score matrix up to 1 GiB (COCO 5k x 25k float32: 0.5 GB)


def _default_block_rows(n_cap: int, device: torch.device) -> int:
    # ~16M scores (64 MB) per block on CPU keeps the block in the last-level cache's neighbourhood and the
    # top-k work per block small; on GPU larger blocks amortise launches.
    budget = (1 << 24) if device.type != "cuda" else (1 << 27)
    return max(1, budget // max(n_cap, 1))


def _gt_caption_table(c2i: Tensor, n_img: int) -> tuple[Tensor, Tensor, Tensor]:
    """Captions grouped by image: ``order`` (caption ids sorted by image, stable), ``starts`` [n_img + 1]
    into it, and a padded table [n_img, max_captions] of caption ids (-1 = padding)."""
    order = torch.argsort(c2i, stable=True)
    counts = torch.bincount(c2i, minlength=n_img)
    starts = torch.zeros(n_img + 1, dtype=torch.long, device=c2i.device)
    starts[1:] = torch.cumsum(counts, 0)
    max_c = int(counts.max())
    slot = torch.arange(c2i.shape[0], device=c2i.device) - starts[c2i[order]]
    table = torch.full((n_img, max_c), -1, dtype=torch.long, device=c2i.device)
    table[c2i[order], slot] = order
    return order, starts, table


def _count_greater(s: Tensor, thr: Tensor, dim: int, buf: Tensor) -> Tensor:
    """``(s > thr).sum(dim)`` as int64, through a float 0/1 buffer (bool sums are ~6x slower on CPU).

    Float sums of 0/1 values are exact while the count stays below 2**24 (float32) / 2**53 (float64)."""
    torch.gt(s, thr, out=buf)
    return buf.sum(dim).long()


def _counts_torch(
    img: Tensor, txt: Tensor, c2i: Tensor, max_k: int, block_size: int | None, max_matrix_bytes: int | None
):
    n_img, n_cap = img.shape[0], txt.shape[0]
    dev = img.device
    rows = int(block_size) if block_size else _default_block_rows(n_cap, dev)
    if rows < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rows = min(rows, n_img)
    budget = _DEFAULT_MAX_MATRIX_BYTES if max_matrix_bytes is None else int(max_matrix_bytes)
    keep_matrix = n_img * n_cap * img.element_size() <= budget
    count_dtype = img.dtype if max(n_img, n_cap) < 2**24 else torch.float64

    order, starts, table = _gt_caption_table(c2i, n_img)
    gt_valid = table >= 0
    gt_cols = table.clamp(min=0)
    txt_t = txt.t()
    full = torch.empty(n_img, n_cap, dtype=img.dtype, device=dev) if keep_matrix else None
    buf = torch.empty(rows, n_cap, dtype=count_dtype, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=img.dtype, device=dev)

    tr_count = torch.empty(n_img, dtype=torch.long, device=dev)
    own = torch.empty(n_cap, dtype=img.dtype, device=dev)
    k_ir = min(max_k, n_img)  # streaming IR: per caption, the k_ir largest image scores (values only)
    top: Tensor | None = None
    for i0 in range(0, n_img, rows):
        i1 = min(i0 + rows, n_img)
        b = i1 - i0
        if full is not None:
            s = torch.matmul(img[i0:i1], txt_t, out=full[i0:i1])
        else:
            s = img[i0:i1] @ txt_t  # [b, n_cap]: the ONLY source of scores for these rows
        # TR: rows are complete.
        best_gt = torch.where(gt_valid[i0:i1], s.gather(1, gt_cols[i0:i1]), neg_inf).amax(1)
        tr_count[i0:i1] = _count_greater(s, best_gt[:, None], 1, buf[:b])
        # IR: own-image scores of the captions whose image lies in this block ...
        caps = order[starts[i0] : starts[i1]]
        own[caps] = s[c2i[caps] - i0, caps]
        if full is None:  # ... and a running top-k of every caption's column
            blk_top = s.topk(min(k_ir, b), dim=0, sorted=False).values.t()  # [n_cap, <= k_ir]
            if top is None:
                top = blk_top
            else:
                merged = torch.cat([top, blk_top], dim=1)
                top = merged.topk(min(k_ir, merged.shape[1]), dim=1, sorted=False).values
    if full is not None:  # IR: column counts against the now complete own scores
        ir_count = torch.zeros(n_cap, dtype=torch.long, device=dev)
        for i0 in range(0, n_img, rows):
            i1 = min(i0 + rows, n_img)
            ir_count += _count_greater(full[i0:i1], own[None, :], 0, buf[: i1 - i0])
    else:
        assert top is not None
        ir_count = (top > own[:, None]).sum(1)
    return ir_count.clamp_(max=max_k), tr_count.clamp_(max=max_k)


def _faiss_search(db: Tensor, queries: Tensor, k: int):
    import faiss

    d = db.shape[1]
    if db.device.type == "cuda" and faiss_available(gpu=True):
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = db.device.index if db.device.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatIP(res, d, cfg)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(db.cpu().numpy(), dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
    return torch.from_numpy(scores), torch.from_numpy(ids)


def _counts_from_topk(scores: Tensor, is_gt: Tensor, max_k: int, n_db: int) -> tuple[Tensor, Tensor]:
    """Capped strictly-higher counts from a sorted top-k (k = min(max_k + 1, n_db)) and a GT mask over it.

    Returns ``(count, ambiguous)``; ambiguous queries (no GT returned, tie at the max_k boundary) need an
    exact recomputation.
    """
    nq, k = scores.shape
    found = is_gt.any(1)
    p = is_gt.to(torch.int8).argmax(1)  # first GT position (if any)
    gt_score = scores.gather(1, p[:, None])
    before = torch.arange(k)[None, :] < p[:, None]
    count = ((scores > gt_score) & before).sum(1)
    ambiguous = torch.zeros(nq, dtype=torch.bool)
    if k < n_db:  # k == max_k + 1: an unreturned GT item scores <= scores[:, max_k]
        boundary_tie = scores[:, max_k] == scores[:, max_k - 1]
        count = torch.where(found, count, torch.full_like(count, max_k))
        ambiguous = ~found & boundary_tie
    elif not bool(found.all()):  # everything was returned, so every query must have found its GT
        raise RuntimeError("faiss search returned a complete ranking without the ground-truth item")
    return count.clamp_(max=max_k), ambiguous


def _exact_rows_ir(img: Tensor, txt: Tensor, c2i: Tensor, caps: Tensor, max_k: int) -> Tensor:
    s = txt[caps] @ img.t()  # [q, n_img]
    own = s.gather(1, c2i[caps][:, None])
    return (s > own).sum(1).clamp_(max=max_k)


def _exact_rows_tr(img: Tensor, txt: Tensor, c2i: Tensor, ims: Tensor, max_k: int) -> Tensor:
    s = img[ims] @ txt.t()  # [q, n_cap]
    gt = c2i[None, :] == ims[:, None]
    best = s.masked_fill(~gt, float("-inf")).amax(1, keepdim=True)
    return (s > best).sum(1).clamp_(max=max_k)


def _counts_faiss(img: Tensor, txt: Tensor, c2i: Tensor, max_k: int):
    n_img, n_cap = img.shape[0], txt.shape[0]
    c2i_cpu = c2i.cpu()

    # IR: captions query the image index.
    k = min(max_k + 1, n_img)
    scores, ids = _faiss_search(img, txt, k)
    ir_count, amb = _counts_from_topk(scores, ids == c2i_cpu[:, None], max_k, n_img)
    ir_count = ir_count.to(img.device)
    for chunk in torch.nonzero(amb).flatten().split(1024):
        chunk = chunk.to(img.device)
        ir_count[chunk] = _exact_rows_ir(img, txt, c2i, chunk, max_k)

    # TR: images query the caption index.
    k = min(max_k + 1, n_cap)
    scores, ids = _faiss_search(txt, img, k)
    gt = (ids >= 0) & (c2i_cpu[ids.clamp(min=0)] == torch.arange(n_img)[:, None])
    tr_count, amb = _counts_from_topk(scores, gt, max_k, n_cap)
    tr_count = tr_count.to(img.device)
    for chunk in torch.nonzero(amb).flatten().split(256):
        chunk = chunk.to(img.device)
        tr_count[chunk] = _exact_rows_tr(img, txt, c2i, chunk, max_k)
    return ir_count, tr_count
