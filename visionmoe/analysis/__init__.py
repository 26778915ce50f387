"""Compute accounting (FLOPs, ρ, total and active parameters), dense twins, and Hessian analysis of MoE models."""

from visionmoe.analysis.hessian import (
    PARAM_GROUPS,
    Eigenpairs,
    HessianOperator,
    HessianSummary,
    SpectralDensity,
    TraceEstimate,
    hessian_params,
    hessian_summary,
    hutchinson_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
)
from visionmoe.analysis.profile import ComputeProfile, ModuleRow, MoELayerProfile, profile
from visionmoe.analysis.twin import MATCHES, dense_twin

__all__ = [
    "MATCHES",
    "PARAM_GROUPS",
    "ComputeProfile",
    "Eigenpairs",
    "HessianOperator",
    "HessianSummary",
    "MoELayerProfile",
    "ModuleRow",
    "SpectralDensity",
    "TraceEstimate",
    "dense_twin",
    "hessian_params",
    "hessian_summary",
    "hutchinson_trace",
    "power_iteration",
    "profile",
    "spectral_density",
    "top_eigenvalues",
]
