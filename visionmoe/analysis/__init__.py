"""Compute accounting (FLOPs, ρ, total and active parameters) and dense twins of MoE models."""

from visionmoe.analysis.profile import ComputeProfile, ModuleRow, MoELayerProfile, profile
from visionmoe.analysis.twin import MATCHES, dense_twin

__all__ = ["MATCHES", "ComputeProfile", "MoELayerProfile", "ModuleRow", "dense_twin", "profile"]
