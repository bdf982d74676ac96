"""Missing-modality substitution (ALGORITHMS.md section 7) and a retrieval scenario that measures it.

Cross-modal retrieval has nothing "missing" by construction (a query is one modality), so the scenario is
fused-item retrieval: each eval image forms an item with its first caption (the "attached" caption), the
item is ``norm(norm(image) + norm(attached caption))``, and the image's OTHER captions are the queries
(caption -> item is ``img_r*``, item -> its captions is ``txt_r*``). A fraction ``rate`` of the items (seeded)
lose their image (or their attached caption), which is then filled:

- ``zero``: nothing (the item is its present modality alone);
- ``mean``: the mean embedding of that modality over the items that have it;
- ``ebr``: ``h_m^-1(h_s(f_s))``, the present modality's code decoded by the missing modality's decoder,
  with s the best-ranked present modality (ranking by mean code cosine on a validation split).

Queries never include the caption a proxy is built from, so substitution cannot leak the query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from repblend.stages.ebr import EBRAdapter, EBRDualHeads
from repblend.stages.heads import DualHeads
from repblend.stages.retrieval import retrieval_metrics

FILLS = ("zero", "mean", "ebr")
SIDES = ("image", "text")

__all__ = ["FILLS", "SIDES", "modality_similarity", "substitution_order", "fill_missing", "item_split",
           "missing_modality_recall", "substitution_ranking"]


def modality_similarity(codes: Sequence[Tensor], present: Tensor | None = None) -> Tensor:
    """[M, M] mean cosine between the codes of the same item, over items where both modalities are present."""
    m, n = len(codes), codes[0].shape[0]
    present = torch.ones(n, m, dtype=torch.bool) if present is None else present.bool().cpu()
    unit = [F.normalize(c.detach().double().cpu(), dim=-1) for c in codes]
    sim = torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            both = present[:, i] & present[:, j]
            value = (unit[i][both] * unit[j][both]).sum(-1).mean() if both.any() else torch.tensor(float("nan"))
            sim[i, j] = sim[j, i] = value
    return sim


def substitution_order(similarity: Tensor) -> list[list[int]]:
    """For each modality, the others from most to least similar (ties: lower index first); NaN ranks last."""
    sim = torch.nan_to_num(similarity.double(), nan=-float("inf"))
    m = sim.shape[0]
    return [sorted((j for j in range(m) if j != i), key=lambda j: (-float(sim[i, j]), j)) for i in range(m)]


def fill_missing(embeddings: Sequence[Tensor], present: Tensor, fill: str, *, adapter: EBRAdapter | None = None,
                 features: Sequence[Tensor] | None = None, order: list[list[int]] | None = None) -> list[Tensor]:
    """Embeddings [N, d] per modality with the rows where ``present[:, i]`` is False filled as ``fill`` says.

    ``ebr`` needs the adapter, the pre-adapter ``features`` f_i (only present rows are read) and the
    substitution ``order``; a row with no modality present stays zero."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    present = present.bool().to(embeddings[0].device)
    out = [e.clone() for e in embeddings]
    for m, emb in enumerate(out):
        gone = ~present[:, m]
        if not gone.any():
            continue
        if fill == "zero":
            emb[gone] = 0.0
        elif fill == "mean":
            emb[gone] = embeddings[m][present[:, m]].mean(0) if present[:, m].any() else 0.0
        else:
            if adapter is None or features is None or order is None:
                raise ValueError("fill='ebr' needs adapter, features and order")
            emb[gone] = 0.0
            todo = gone.clone()
            for s in order[m]:
                rows = todo & present[:, s]
                if rows.any():
                    emb[rows] = adapter.translate(m, s, features[s][rows]).to(emb.dtype)
                    todo &= ~rows
    return out


def item_split(caption_to_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(item images, their attached caption, query captions, query -> item index) over images with >= 2 captions."""
    c2i = caption_to_image.long().cpu()
    n_img = int(c2i.max()) + 1
    first = torch.full((n_img,), len(c2i), dtype=torch.long).scatter_reduce(0, c2i, torch.arange(len(c2i)), "amin")
    counts = torch.bincount(c2i, minlength=n_img)
    images = torch.nonzero(counts >= 2).flatten()
    item_of = torch.full((n_img,), -1, dtype=torch.long)
    item_of[images] = torch.arange(len(images))
    attached = first[images]
    is_query = (item_of[c2i] >= 0) & ~torch.isin(torch.arange(len(c2i)), attached)
    queries = torch.nonzero(is_query).flatten()
    return images, attached, queries, item_of[c2i[queries]]


def _sides(model: DualHeads | EBRDualHeads) -> tuple:
    """(feature maps f_i, embedding maps) per modality; without EBR the two coincide."""
    if isinstance(model, EBRDualHeads):
        return (model.heads.image, model.heads.text), (model.image, model.text)
    return (model.image, model.text), (model.image, model.text)


@torch.no_grad()
def substitution_ranking(model: EBRDualHeads, image_features: Tensor, text_features: Tensor,
                         caption_to_image: Tensor) -> tuple[Tensor, list[list[int]]]:
    """Modality similarity of the codes on a validation split (items as in ``item_split``) and its order."""
    model.eval()
    images, attached, _, _ = item_split(caption_to_image)
    codes = model.codes(image_features[images.to(image_features.device)],
                        text_features[attached.to(text_features.device)])
    sim = modality_similarity(codes)
    return sim, substitution_order(sim)


@torch.no_grad()
def missing_modality_recall(model: DualHeads | EBRDualHeads, image_features: Tensor, text_features: Tensor,
                            caption_to_image: Tensor, *, missing: str, rate: float, fill: str, seed: int = 0,
                            order: list[list[int]] | None = None) -> dict[str, float]:
    """Fused-item retrieval recall (see the module docstring) with ``rate`` of the items missing ``missing``."""
    if missing not in SIDES:
        raise ValueError(f"missing must be one of {SIDES}, got {missing!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"missing rate must be in [0, 1], got {rate}")
    if fill == "ebr" and not isinstance(model, EBRDualHeads):
        raise ValueError("fill='ebr' needs a model trained with EBR (it has no decoders otherwise)")
    model.eval()
    device = image_features.device
    images, attached, queries, query_item = (t.to(device) for t in item_split(caption_to_image))
    (f_img, f_txt), (e_img, e_txt) = _sides(model)
    x_img, x_att = image_features[images].float(), text_features[attached].float()
    features = [f_img(x_img), f_txt(x_att)]
    embeddings = [e_img(x_img), e_txt(x_att)]
    n = len(images)
    present = torch.ones(n, 2, dtype=torch.bool, device=device)
    drop = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(rate * n)].to(device)
    present[drop, SIDES.index(missing)] = False
    adapter = model.adapter if isinstance(model, EBRDualHeads) else None
    filled = fill_missing(embeddings, present, fill, adapter=adapter, features=features,
                          order=order or [[1], [0]])
    items = F.normalize(F.normalize(filled[0], dim=-1) + F.normalize(filled[1], dim=-1), dim=-1)
    return retrieval_metrics(items, e_txt(text_features[queries].float()), query_item)
