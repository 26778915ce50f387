"""What each router says about its own routing (experts per token, capacity), checked by hand.

Models (airbench's dense twin), :func:`visionmoe.analysis.dense_twin` and :func:`visionmoe.analysis.profile`
ask these instead of guessing from attributes, so a new router answers in its own class.
"""

import pytest
from torch import nn

from visionmoe import MoE
from visionmoe.analysis.twin import dense_twin
from visionmoe.layers.routers import (
    ROUTERS,
    DenseRouter,
    ExpertChoiceRouter,
    SinkhornTopKRouter,
    SoftPerSampleRouter,
    SoftRouter,
    SparseExpertChoiceRouter,
    TopKRouter,
)

D = 16


def test_token_choice_sends_each_token_to_k_experts_whatever_the_group():
    router = TopKRouter(D, 8, k=2, capacity_factor=1.25, eval_capacity_factor=2.0)
    assert router.experts_per_token() == 2.0 and router.experts_per_token(49) == 2.0
    assert not router.depends_on_group_size
    # Training C = ceil(k·S·cf/E) = ceil(2·49·1.25/8) = ceil(15.3125) = 16; eval: ceil(2·49·2/8) = ceil(24.5) = 25.
    assert router.group_capacity(49) == 16
    router.eval()
    assert router.group_capacity(49) == 25
    assert SinkhornTopKRouter(D, 8, k=2).experts_per_token() == 2.0


def test_dropless_token_choice_has_no_capacity_buffer():
    router = TopKRouter(D, 8, k=2, capacity_factor=None)
    assert router.group_capacity(49) is None and router.experts_per_token(49) == 2.0


def test_expert_choice_answers_c_times_e_over_s():
    router = ExpertChoiceRouter(D, 8, capacity_factor=2.0)
    assert router.depends_on_group_size
    # S = 49: C = ceil(49·2/8) = ceil(12.25) = 13 tokens per expert; 13·8 = 104 slots over 49 tokens.
    assert router.experts_per_token(49) == pytest.approx(104 / 49)
    assert router.group_capacity(49) == 13
    assert router.experts_per_token() == 2.0  # nominal: the capacity factor
    # S = 4: C = ceil(4·2/8) = 1, so 1·8/4 = 2 experts per token.
    assert router.experts_per_token(4) == 2.0
    assert SparseExpertChoiceRouter(D, 8, capacity_factor=2.0).experts_per_token(49) == pytest.approx(104 / 49)


def test_expert_choice_with_a_fixed_capacity_needs_the_group_size_and_caps_at_s():
    router = ExpertChoiceRouter(D, 8, capacity=10)
    with pytest.raises(ValueError, match=r"'expert_choice' with capacity=10 needs the tokens per group"):
        router.experts_per_token()
    # S = 49: 10 tokens per expert, 10·8/49. S = 4: an expert takes each token at most once, so C = 4, 4·8/4 = 8.
    assert router.experts_per_token(49) == pytest.approx(80 / 49)
    assert router.experts_per_token(4) == 8.0 and router.group_capacity(4) == 4


def test_soft_moe_shares_e_times_p_slots_among_the_group():
    # E = 8 experts × P = 2 slots = 16 slots, each one expert wide, shared by S = 64 tokens: 16/64 = 0.25.
    for cls in (SoftRouter, SoftPerSampleRouter):
        router = cls(D, 8, slots_per_expert=2)
        assert router.depends_on_group_size and router.experts_per_token(64) == 0.25
        assert router.group_capacity(64) is None
        with pytest.raises(ValueError, match=f"router '{cls.name}' needs the tokens per group"):
            router.experts_per_token()


def test_the_dense_router_runs_every_expert():
    router = DenseRouter(D, 4)
    assert router.experts_per_token() == 4.0 and router.experts_per_token(9) == 4.0
    assert router.group_capacity(9) is None
    assert not router.routed and all(cls.routed for name, cls in ROUTERS.items() if name != "dense")


class HalfOfTheExperts(DenseRouter):
    """A new router, in one class: its dense twin follows from its own answer, nothing else is touched."""

    name = "half_of_the_experts"

    def experts_per_token(self, tokens: int | None = None) -> float:
        return self.num_experts / 2


def test_a_dense_twin_asks_the_router():
    # E = 4 experts of width H = 16, 4 / 2 = 2 experts per token: a dense FFN of width 2·16 = 32.
    twin = dense_twin(nn.Sequential(MoE(D, 4, 16, router=HalfOfTheExperts)), match="flops")
    assert twin[0].hidden_dim == 32


@pytest.mark.parametrize("name", list(ROUTERS))
def test_every_registered_router_answers_with_the_group_size(name):
    router = ROUTERS[name](D, 4)
    assert router.experts_per_token(16) > 0
