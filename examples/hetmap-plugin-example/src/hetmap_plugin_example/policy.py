"""``frequency-x-norm``: rank experts by calibration density x max-neuron-norm score."""

from __future__ import annotations

from typing import ClassVar

from hetmap.common.errors import MissingDataError
from hetmap.compiler.ir.annotations import Density, ExpertScore


class FrequencyTimesNorm:
    name: ClassVar[str] = "frequency-x-norm"
    description: ClassVar[str] = "density x max-norm score first (example plugin)"
    fixed: ClassVar[str | None] = None

    def scores(self, graph, experts, ctx):
        scores = {}
        for node in experts:
            density, score = node.get(Density), node.get(ExpertScore)
            if density is None or density.source != "calibration" or score is None:
                raise MissingDataError(
                    f"policy frequency-x-norm needs calibrated densities and expert scores for "
                    f"{node.name}: run density and expert-score on a model with weights")
            scores[node.name] = density.value * score.max_norm
        return scores
