"""The config's ``loss.divergence`` choices and the loss registry name the same divergences.

The config lists them as a ``Literal`` so a typo fails at load time with the choices named; the
registry (``losses.DIVERGENCES``) is what runs. A divergence added to one and not the other would
either be refused by the config or fail only when a worker builds its loss.
"""

import typing

from rayjobs.distillation.config import LossConfig
from rayjobs.distillation.losses import DIVERGENCES


def test_every_configurable_divergence_is_implemented_and_every_implemented_one_is_configurable():
    configurable = set(typing.get_args(LossConfig.model_fields["divergence"].annotation))
    assert configurable, "loss.divergence is no longer a Literal of names"
    assert not configurable - set(DIVERGENCES), "in the config's Literal but not in losses.DIVERGENCES"
    assert not set(DIVERGENCES) - configurable, "in losses.DIVERGENCES but not in the config's Literal"


def test_the_default_divergence_is_implemented():
    assert LossConfig().divergence in DIVERGENCES
