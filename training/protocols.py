"""Which :class:`~reefcap.training.protocol.Protocol` runs a recipe, and the run options each one honours.

| protocol | recipes | TrainConfig fields honoured |
|----------|---------|-----------------------------|
| ``caption`` (:mod:`~reefcap.training.caption`) | no ``experts:`` section | all |
| ``experts`` (:mod:`~reefcap.training.experts`) | an ``experts:`` section (GuiDG) | all but ``eval_beams`` |

A field a protocol does not honour must keep its default: set, it is refused with an error naming it
(:func:`check_honoured`), never silently ignored.
"""

from __future__ import annotations

from reefcap.models.errors import ReefcapError

from .config import Recipe, TrainConfig
from .protocol import ALL_FIELDS, Protocol


def protocol_class(recipe: Recipe) -> type[Protocol]:
    """The protocol that runs ``recipe``: GuiDG's experts with an ``experts:`` section, captioning otherwise."""
    if recipe.experts is not None:
        from .experts import ExpertsProtocol

        return ExpertsProtocol
    from .caption import CaptionProtocol

    return CaptionProtocol


def check_honoured(recipe: Recipe, config: TrainConfig) -> None:
    """Refuse a run config that sets a field ``recipe``'s protocol cannot act on (rather than ignore it)."""
    cls = protocol_class(recipe)
    default = TrainConfig()
    for name in sorted(ALL_FIELDS - cls.honours):
        value = getattr(config, name)
        if value != getattr(default, name):
            raise ReefcapError(
                f"recipe {recipe.name!r} ({cls.kind} protocol) cannot honour train.{name} = {value!r}; "
                f"leave it at its default {getattr(default, name)!r}"
            )


def protocol_for(recipe: Recipe, config: TrainConfig, train: list, val: list | None, air: list | None) -> Protocol:
    """The protocol instance for one run; refuses config fields it cannot honour (:func:`check_honoured`)."""
    check_honoured(recipe, config)
    return protocol_class(recipe)(recipe, config, train, val, air)
