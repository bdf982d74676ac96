"""The synthetic task behind collapse_study.py: two modalities, injected noise, a narrow fusion head.

Every sample has a class y with a latent prototype mu_y. Modality A sees ``mu_y + eps_A`` through a random
linear map plus ``noise_dims`` injected non-predictive features of scale ``noise``; modality B sees
``mu_y + eps_B`` (more within-class spread: the weaker modality) through another map. Both modalities are
informative on their own, so a model that uses both can still classify when one is missing; a collapsed
model that ignores B fails when A is missing.

Model: per-modality MLP encoders -> concat -> fusion Linear(2E -> rank) + ReLU (the narrow, low-rank
bottleneck) -> Linear(rank -> classes). Arms (ALGORITHMS.md section 7 and the anchors' proposal):
``vanilla``; ``kd`` (a unimodal teacher on A distilled into B's encoder through an auxiliary head);
``ebr`` (projector/decoder per modality, discriminator behind a gradient-reversal layer, decoded features
feed the fusion; a missing modality is substituted by h_m^-1(h_s(f_s))); ``dropout`` (modality dropout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblend.stages.diagnostics import effective_rank
from repblend.stages.ebr import EBRAdapter, mlp
from repblend.stages.missing import modality_similarity

ARMS = ("vanilla", "kd", "ebr", "dropout", "b_only")  # b_only: reference, trained on B alone


@dataclass(frozen=True)
class TaskSpec:
    classes: int = 10
    latent: int = 8
    pred_dims: int = 16  # predictive features per modality
    noise_dims: int = 128  # injected noise features (modality A)
    spread_a: float = 1.0  # within-class spread of A's latent
    spread_b: float = 1.4  # B is the weaker modality
    train: int = 1000  # few samples, many noise features: A's noise can be memorised
    test: int = 2000


@dataclass(frozen=True)
class TrainSpec:
    enc: int = 32  # encoder width E
    rank: int = 8  # fusion bottleneck width (narrow: < the latent features of both modalities together)
    epochs: int = 40
    batch: int = 128
    lr: float = 3e-3
    alpha: float = 0.01  # EBR weight of L_md
    ebr_hidden: int = 64
    ebr_shared: int = 16
    ebr_residual: bool = False  # decoded = f + h^-1(g), starting as no adapter (stages/ebr.py; not the paper's form)
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    dropout_p: float = 0.5  # modality dropout: probability that a sample loses one (random) modality


def make_task(spec: TaskSpec, noise: float, seed: int) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """{"train"|"val"|"test": (x_a, x_b, y)}; the maps and prototypes depend on the seed, not on ``noise``."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(spec.classes, spec.latent, generator=g) * 1.5
    map_a = torch.randn(spec.latent, spec.pred_dims, generator=g) / spec.latent ** 0.5
    map_b = torch.randn(spec.latent, spec.pred_dims, generator=g) / spec.latent ** 0.5
    out = {}
    for split, n in (("train", spec.train), ("val", spec.test // 2), ("test", spec.test)):
        y = torch.randint(spec.classes, (n,), generator=g)
        z_a = protos[y] + spec.spread_a * torch.randn(n, spec.latent, generator=g)
        z_b = protos[y] + spec.spread_b * torch.randn(n, spec.latent, generator=g)
        x_a = torch.cat([z_a @ map_a, noise * torch.randn(n, spec.noise_dims, generator=g)], dim=1)
        out[split] = (x_a, z_b @ map_b, y)
    return out


class FusionNet(nn.Module):
    def __init__(self, d_a: int, d_b: int, classes: int, t: TrainSpec, ebr: bool = False, kd: bool = False):
        super().__init__()
        self.encoders = nn.ModuleList([mlp(d_a, t.enc, t.enc), mlp(d_b, t.enc, t.enc)])
        self.adapter = EBRAdapter((t.enc, t.enc), t.ebr_hidden, t.ebr_shared, t.ebr_residual) if ebr else None
        self.fusion = nn.Linear(2 * t.enc, t.rank)
        self.classifier = nn.Linear(t.rank, classes)
        self.aux_b = nn.Linear(t.enc, classes) if kd else None

    def encode(self, x_a: Tensor, x_b: Tensor) -> list[Tensor]:
        return [self.encoders[0](x_a), self.encoders[1](x_b)]

    def fused(self, feats: list[Tensor]) -> Tensor:
        """The bottleneck activations: the fused representation whose rank collapses."""
        return F.relu(self.fusion(torch.cat(feats, dim=1)))

    def decoded(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        codes = [self.adapter.encode(i, f) for i, f in enumerate(feats)]
        return [self.adapter.reconstruct(i, f, g) for i, (f, g) in enumerate(zip(feats, codes))], codes

    def representation(self, x_a: Tensor, x_b: Tensor, missing: int | None = None, substitute: bool = False):
        """Fused activations; ``missing`` zero-fills that modality's input, or with ``substitute`` (EBR only)
        replaces its decoded feature by h_m^-1(h_s(f_s)) of the other modality."""
        if missing is not None and not substitute:
            x_a, x_b = (torch.zeros_like(x_a), x_b) if missing == 0 else (x_a, torch.zeros_like(x_b))
        feats = self.encode(x_a, x_b)
        if self.adapter is not None:
            feats, _ = self.decoded(feats)
            if missing is not None and substitute:
                present = 1 - missing
                feats[missing] = self.adapter.translate(missing, present, self.encode(x_a, x_b)[present])
        return self.fused(feats)


def _batches(n: int, batch: int, g: torch.Generator):
    order = torch.randperm(n, generator=g)
    return [order[i:i + batch] for i in range(0, n, batch)]


def train_teacher(data, classes: int, t: TrainSpec, seed: int) -> nn.Module:
    """Unimodal teacher on A (the strong modality) for cross-modal KD."""
    torch.manual_seed(seed + 7)
    x_a, _, y = data["train"]
    model = nn.Sequential(mlp(x_a.shape[1], t.enc, t.enc), nn.ReLU(), nn.Linear(t.enc, classes))
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    g = torch.Generator().manual_seed(seed + 7)
    for _ in range(t.epochs):
        for idx in _batches(len(y), t.batch, g):
            loss = F.cross_entropy(model(x_a[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_arm(arm: str, data, classes: int, t: TrainSpec, seed: int) -> FusionNet:
    x_a, x_b, y = data["train"]
    teacher_logits = None
    if arm == "kd":
        teacher = train_teacher(data, classes, t, seed)
        with torch.no_grad():
            teacher_logits = teacher(x_a)
    torch.manual_seed(seed)
    model = FusionNet(x_a.shape[1], x_b.shape[1], classes, t, ebr=arm == "ebr", kd=arm == "kd")
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(t.epochs):
        for idx in _batches(len(y), t.batch, g):
            a, b = x_a[idx], x_b[idx]
            if arm == "b_only":  # reference: what B alone supports, for judging how much a fused model uses it
                a = torch.zeros_like(a)
            if arm == "dropout":
                drop = torch.rand(len(idx), generator=g) < t.dropout_p
                which = torch.rand(len(idx), generator=g) < 0.5
                a = a * ~(drop & which)[:, None]
                b = b * ~(drop & ~which)[:, None]
            feats = model.encode(a, b)
            extra = torch.zeros(())
            if arm == "ebr":
                feats, codes = model.decoded(feats)
                extra = t.alpha * model.adapter.discrimination_loss(codes, reverse=True)
            elif arm == "kd":
                tau = t.kd_temperature
                extra = t.kd_weight * tau ** 2 * F.kl_div(F.log_softmax(model.aux_b(feats[1]) / tau, dim=1),
                                                         F.softmax(teacher_logits[idx] / tau, dim=1),
                                                         reduction="batchmean")
            loss = F.cross_entropy(model.classifier(model.fused(feats)), y[idx]) + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def measure(model: FusionNet, data, split: str = "test") -> dict[str, float]:
    """Accuracy complete / with A or B missing (zero-fill; EBR also with substitution), fused effective rank."""
    x_a, x_b, y = data[split]

    def acc(**kw) -> float:
        return float((model.classifier(model.representation(x_a, x_b, **kw)).argmax(1) == y).float().mean()) * 100

    feats = model.encode(x_a, x_b)
    out = {"acc": acc(), "acc_no_a": acc(missing=0), "acc_no_b": acc(missing=1),
           "erank": effective_rank(model.representation(x_a, x_b)), "erank_b": effective_rank(feats[1])}
    if model.adapter is not None:
        out["acc_no_a_sub"] = acc(missing=0, substitute=True)
        out["acc_no_b_sub"] = acc(missing=1, substitute=True)
        out["code_cos"] = float(modality_similarity(model.decoded(feats)[1])[0, 1])
    return out
