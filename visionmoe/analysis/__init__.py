"""Compute accounting (FLOPs, ρ, active parameters), dense twins, Hessian analysis and routing analytics."""

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
from visionmoe.analysis.routing import (
    COLLAPSE_THRESHOLD,
    LayerRouting,
    RoutingReport,
    collapsed_experts,
    load_history,
    mutual_information,
    plot_class_expert,
    plot_load_history,
    routing_report,
)
from visionmoe.analysis.twin import MATCHES, dense_twin

__all__ = [
    "COLLAPSE_THRESHOLD",
    "MATCHES",
    "PARAM_GROUPS",
    "ComputeProfile",
    "Eigenpairs",
    "HessianOperator",
    "HessianSummary",
    "LayerRouting",
    "MoELayerProfile",
    "ModuleRow",
    "RoutingReport",
    "SpectralDensity",
    "TraceEstimate",
    "collapsed_experts",
    "dense_twin",
    "hessian_params",
    "hessian_summary",
    "hutchinson_trace",
    "load_history",
    "mutual_information",
    "plot_class_expert",
    "plot_load_history",
    "power_iteration",
    "profile",
    "routing_report",
    "spectral_density",
    "top_eigenvalues",
]
