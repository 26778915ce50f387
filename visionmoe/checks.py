"""Value checks of tensors shared across layers: one rule, one wording of the error.

A NaN or inf that reaches a router, a loss or a Hessian-vector product spreads silently through
everything after it; the check names what went wrong where it first appears, with the counts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(t: Tensor, what: str) -> None:
    """Raise ``FloatingPointError`` naming ``what`` and its NaN and inf counts unless ``t`` is all finite.

    The check reads ``t`` on the host: callers on a hot accelerator path decide when to pay for it.
    """
    if t.is_floating_point() and t.numel():
        low, high = torch.aminmax(t)  # one reduction: a NaN propagates to both, an inf is one of them
        finite = bool(torch.isfinite(low) & torch.isfinite(high))
    else:
        finite = bool(torch.isfinite(t).all())
    if not finite:
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise FloatingPointError(f"{what} is not finite: {nan} NaN and {inf} inf of {t.numel()} values")
