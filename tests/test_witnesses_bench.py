"""bench.witnesses' pure parts: the witnesses' selection (only the owner's two models decide it), the identity
trigger that lets verify's calibration run on unmodified images, and the fixed-n p-value."""
from __future__ import annotations

import pytest
import torch

from bench.witnesses import binomial_p, identity_trigger, select_witnesses


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


def test_binomial_p():
    assert binomial_p(0, 10, 0.1) == pytest.approx(1.0)
    assert binomial_p(10, 10, 0.1) == pytest.approx(1e-10)
    assert binomial_p(3, 10, 0.1) == pytest.approx(1 - sum(__import__("math").comb(10, k) * .1 ** k * .9 ** (10 - k)
                                                           for k in range(3)))
    assert binomial_p(0, 0, 0.1) == 1.0
