"""Route one batch through every router and report loads, drops, entropy and speed.

The tokens are image-like: a batch of B "images" of N patch tokens drawn from a mixture of a few
clusters with unequal weights (as patch embeddings are: sky, texture, object), so that a router
that follows the logits alone overloads the experts of the frequent clusters, and a balanced router
visibly does not. Every router starts from the same weights for a fair side-by-side.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from visionmoe.analysis.speed import iqr
from visionmoe.layers import ROUTERS, MoE


@dataclass(frozen=True)
class DemoConfig:
    batch: int = 8
    tokens: int = 256
    dim: int = 128
    num_experts: int = 8
    hidden_dim: int = 256
    k: int = 2
    capacity_factor: float = 1.0
    clusters: int = 4
    seed: int = 0
    repeats: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:  # one line naming a bad value, before any router is built
        sizes = ("batch", "tokens", "dim", "num_experts", "hidden_dim", "k", "clusters", "repeats")
        if bad := [f"{name}={getattr(self, name)!r}" for name in sizes if getattr(self, name) < 1]:
            raise ValueError(f"demo {', '.join(bad)}: expected >= 1")
        if self.k > self.num_experts:
            raise ValueError(f"demo k={self.k} > num_experts={self.num_experts}: expected 1 <= k <= num_experts")
        if not self.capacity_factor > 0:
            raise ValueError(f"demo capacity_factor={self.capacity_factor!r}: expected > 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"demo threads={self.threads!r}: expected >= 1 (or None: torch's count)")


def clustered_tokens(cfg: DemoConfig) -> torch.Tensor:
    """(B, N, D) tokens from ``clusters`` Gaussian clusters with weights ∝ 1, 1/2, 1/3, ..."""
    g = torch.Generator().manual_seed(cfg.seed)
    centres = torch.randn(cfg.clusters, cfg.dim, generator=g) * 2.0
    weights = 1.0 / torch.arange(1, cfg.clusters + 1, dtype=torch.float32)
    which = torch.multinomial(weights, cfg.batch * cfg.tokens, replacement=True, generator=g)
    x = centres[which] + torch.randn(cfg.batch * cfg.tokens, cfg.dim, generator=g)
    return x.reshape(cfg.batch, cfg.tokens, cfg.dim)


def router_settings(name: str, cfg: DemoConfig) -> dict:
    """Settings that give every router the same active compute: each token sees k experts' worth."""
    if name in ("topk", "sinkhorn_topk"):
        return {"k": cfg.k, "capacity_factor": cfg.capacity_factor}
    if name in ("expert_choice", "sinkhorn_expert_choice", "sparse_expert_choice"):
        return {"capacity_factor": cfg.k * cfg.capacity_factor}  # C = ceil(k·S·cf/E), as top-k
    if name in ("soft", "soft_per_sample"):
        # E·P slots per image of N tokens process k·N token-expert pairs' worth: P = k·N/E.
        return {"router_options": {"slots_per_expert": max(1, cfg.k * cfg.tokens // cfg.num_experts)}}
    return {}


def build(name: str, cfg: DemoConfig) -> MoE:
    torch.manual_seed(cfg.seed)
    if name == "dense":  # the dense FFN of equal active FLOPs: k experts' width, one expert
        return MoE(cfg.dim, 1, cfg.k * cfg.hidden_dim, router="dense")
    return MoE(cfg.dim, cfg.num_experts, cfg.hidden_dim, router=name, **router_settings(name, cfg))


def time_forward_backward(moe: MoE, x: torch.Tensor, repeats: int, threads: int) -> list[float]:
    """Seconds per forward+backward, one measurement per repeat (torch.utils.benchmark)."""
    from torch.utils import benchmark  # lazy: it loads setuptools, which `visionmoe --help` never needs

    timer = benchmark.Timer(
        stmt="moe.zero_grad(set_to_none=True); moe(x).sum().backward()",
        globals={"moe": moe, "x": x},
        num_threads=threads,
    )
    timer.timeit(1)  # warm-up
    return [timer.timeit(1).median for _ in range(repeats)]


def run(cfg: DemoConfig) -> list[dict]:
    """One row per router: loads (% of the busiest), drops, entropy, and time vs the dense FFN."""
    threads = cfg.threads or torch.get_num_threads()
    x = clustered_tokens(cfg)
    rows = []
    for name in ROUTERS:
        moe = build(name, cfg).train()
        torch.manual_seed(cfg.seed)
        moe(x)
        stats = moe.last_stats
        times = time_forward_backward(moe, x, cfg.repeats, threads)
        rows.append(
            {
                "router": name,
                "tokens_per_expert": [round(v) for v in stats.tokens_per_expert.tolist()],
                "load_cv": stats.load_cv,
                "dropped": stats.dropped_fraction,
                "unrouted": stats.unrouted_fraction,
                "entropy": stats.router_entropy,
                "seconds": statistics.median(times),
                "iqr": iqr(times),
            }
        )
    dense = next(r["seconds"] for r in rows if r["router"] == "dense")
    for r in rows:
        r["vs_dense"] = r["seconds"] / dense
    return rows
