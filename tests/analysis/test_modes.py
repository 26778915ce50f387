"""eval_mode: eval inside, each module's own flag back afterwards, even after an error."""

import pytest
from torch import nn

from visionmoe.analysis.modes import eval_mode


def test_eval_mode_restores_mixed_flags_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model[2].eval()  # an owner froze the norm's statistics: that must survive the analysis
    before = [m.training for m in model.modules()]
    assert before == [True, True, True, False]
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before
