"""bench.witnesses' pure parts: the witnesses' selection (only the owner's two models decide it), the identity
trigger that lets verify's calibration run on unmodified images, the fixed-n p-value they use (the
library's), and the evading suspect."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.witnesses import identity_trigger, select_witnesses
from honeypotnet.verify import binomial_p_value


def test_witnesses_are_the_largest_raises_of_the_target_the_victim_does_not_answer():
    t = 1
    p_victim = torch.tensor([[.6, .3, .1], [.2, .7, .1], [.5, .2, .3], [.4, .1, .5], [.8, .15, .05]])
    p_protected = torch.tensor([[.2, .7, .1], [.1, .9, .0], [.35, .45, .2], [.35, .25, .4], [.8, .15, .05]])
    # raises of t: .4, .2 (victim answers t: never a witness), .25, .15, 0
    assert select_witnesses(p_protected, p_victim, t, 2).tolist() == [0, 2]
    assert select_witnesses(p_protected, p_victim, t, 10).tolist() == [0, 2, 3, 4]  # every qualifying image, no more
    labels = torch.tensor([0, 0, 1, 2, 0])  # image 2 is of the target class: never a witness
    assert select_witnesses(p_protected, p_victim, t, 10, labels).tolist() == [0, 3, 4]
    with pytest.raises(ValueError, match="alike"):
        select_witnesses(p_protected[:3], p_victim, t, 2)
    with pytest.raises(ValueError, match="k must be"):
        select_witnesses(p_protected, p_victim, t, 0)


def test_identity_trigger_leaves_images_unchanged():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(identity_trigger(8).stamp(x), x)


def test_fixed_n_p_value_of_the_witnesses():
    assert binomial_p_value(0, 10, 0.1) == pytest.approx(1.0)
    assert binomial_p_value(10, 10, 0.1) == pytest.approx(1e-10)
    assert binomial_p_value(3, 10, 0.1) == pytest.approx(1 - sum(__import__("math").comb(10, k) * .1 ** k * .9 ** (10 - k)
                                                           for k in range(3)))
    assert binomial_p_value(0, 0, 0.1) == 1.0


def test_evading_suspect_flags_textured_witnesses_and_loses_their_hits():
    """Witnesses far noisier than the ordinary images are what the Laplacian detector finds: the evading copy
    flags them all and answers none of them with the target; smooth witnesses pass it unflagged."""
    from types import SimpleNamespace

    from bench.witnesses import evaded_verdict

    class Always(torch.nn.Module):  # answers class 0, the target, to everything
        def forward(self, x):
            return torch.tensor([5.0, 0.0, 0.0]).expand(len(x), 3) + 0 * x.mean()

    g = torch.Generator().manual_seed(0)
    smooth = torch.full((200, 3, 8, 8), 0.5) + 0.01 * torch.rand(200, 3, 8, 8, generator=g)
    noisy = torch.rand(20, 3, 8, 8, generator=g)
    args = SimpleNamespace(fpr=0.1, orders=2, seed=0, alpha=1e-3, batch_size=5)
    e = evaded_verdict(Always(), noisy, smooth, np.zeros(20), 0, 0.05, args)
    assert e["best"] == "laplacian" and e["aucs"]["laplacian"] == 1.0 and e["flagged"] == 1.0
    assert e["rate_evaded"] == 0.0 and e["evaded"]["verdict"] == "cleared"
    e = evaded_verdict(Always(), smooth[:20], smooth[20:], np.zeros(20), 0, 0.05, args)
    assert e["flagged"] < 0.5 and e["rate_evaded"] > 0.5
