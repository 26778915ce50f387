"""Soft MoE (Puigcerver et al. 2023) and its per-sample variant (Sun et al. 2026).

Soft MoE, Sec. 2.1: with slot parameters Φ (D, E·P) and logits X Φ (S, E·P),

    D = softmax over the S tokens of the group, per slot     (eq. 1: slot input X̃ = Dᵀ X)
    C = softmax over the E·P slots, per token                (eq. 3: Y = C Ỹ)

Every slot's input is a convex combination of the group's tokens, so when the group spans the
batch (per-sample CNN features routed over the batch axis) each sample's output depends on the
other samples. Sun et al. (2026) identify this as why Soft MoE fails on per-sample CNN features
and normalise the dispatch over the slots of each token instead, which, with groups inside one
sample, keeps samples independent.
"""

from __future__ import annotations

from torch import Tensor

from visionmoe.routing.plan import SoftRouting


def soft_routing(logits: Tensor) -> SoftRouting:
    """Soft MoE weights from (G, S, E, P) logits: dispatch over tokens, combine over slots."""
    G, S, E, P = logits.shape
    dispatch = logits.softmax(dim=1)  # (G, S, E, P): each slot's weights over the S tokens sum to 1
    combine = logits.reshape(G, S, E * P).softmax(dim=-1).reshape(G, S, E, P)  # each token's over slots
    return SoftRouting(dispatch, combine)


def soft_per_sample_routing(logits: Tensor) -> SoftRouting:
    """Per-sample Soft MoE (Sun et al. 2026): dispatch and combine both softmax over a token's slots.

    Nothing is normalised across tokens, so a token's slot weights never depend on other tokens;
    with groups that stay inside one sample, no sample's output depends on another's.
    """
    G, S, E, P = logits.shape
    weights = logits.reshape(G, S, E * P).softmax(dim=-1).reshape(G, S, E, P)  # (G, S, E, P)
    return SoftRouting(weights, weights)
