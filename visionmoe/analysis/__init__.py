"""Compute accounting (FLOPs, ρ, active parameters), dense twins, Hessian, loss surface, routing analytics.

What ``visionmoe analyze`` runs on a trained run is :mod:`visionmoe.analysis.trained_run`; it reads runs
through ``visionmoe.train`` (which imports this package), so it is imported on its own, not from here.
"""

from visionmoe.analysis.hessian import (
    PARAM_GROUPS,
    Eigenpairs,
    HessianOperator,
    HessianSummary,
    SpectralDensity,
    TraceEstimate,
    head_params,
    hessian_params,
    hessian_summary,
    hutchinson_trace,
    plot_spectral_density,
    power_iteration,
    spectral_density,
    top_eigenvalues,
)
from visionmoe.analysis.landscape import (
    LossLandscape,
    hessian_direction,
    loss_line,
    loss_plane,
    plot_landscape,
    random_direction,
)
from visionmoe.analysis.profile import ComputeProfile, ModuleRow, MoELayerProfile, profile_model
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
    "LossLandscape",
    "MoELayerProfile",
    "ModuleRow",
    "RoutingReport",
    "SpectralDensity",
    "TraceEstimate",
    "collapsed_experts",
    "dense_twin",
    "head_params",
    "hessian_direction",
    "hessian_params",
    "hessian_summary",
    "hutchinson_trace",
    "load_history",
    "loss_line",
    "loss_plane",
    "mutual_information",
    "plot_class_expert",
    "plot_landscape",
    "plot_load_history",
    "plot_spectral_density",
    "power_iteration",
    "profile_model",
    "random_direction",
    "routing_report",
    "spectral_density",
    "top_eigenvalues",
]
