"""A shared check for model tests: after a backward pass, every parameter really learns."""

import torch

import visionmoe


def assert_every_parameter_learns(model: torch.nn.Module) -> None:
    """Every parameter has a finite gradient; every expert that processed tokens and every router
    parameter a non-zero one (a None check alone passes if an expert's gradient is silently cut,
    e.g. detached gates or a skipped expert filled with zeros)."""
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"
    for lname, moe in visionmoe.moe_layers(model):
        used = moe.last_stats.tokens_per_expert > 0
        assert used.any(), lname
        for e in used.nonzero().flatten().tolist():
            for w in (moe.experts.w1, moe.experts.w2, moe.experts.b1, moe.experts.b2):
                assert w.grad[e].abs().sum() > 0, f"{lname}: expert {e} processed tokens but got a zero gradient"
        for rname, param in moe.router.named_parameters():
            assert param.grad.abs().sum() > 0, f"{lname}.router.{rname} got a zero gradient"
