"""The ``adaptive`` route in an evaluation: the profile's policy picks one option (receiver alone, T2T, or C2C with
a codec and layer budget) for the configured link and budget, which then answers as its own route would, over
its own link (:class:`AdaptiveRoute`).

Bytes of an option are predicted as the mean bytes per question its profile measured (exact for
last-token fusion, one position per question), so the choice is the same for every question of an
evaluation with one link; :func:`fedrefine.federation.adaptive.sweep` explores links and budgets per question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fedrefine.evaluation.config import AdaptiveRouteConfig
from fedrefine.evaluation.handler import RouteHandler
from fedrefine.evaluation.metrics import RouteResult
from fedrefine.evaluation.question_batch import QuestionBatch
from fedrefine.federation.adaptive import AdaptivePolicy, LinkProfile, RouteOption, load_profile
from fedrefine.tasks.routes import Route
from fedrefine.wire import LinkConfig


class AdaptiveChoice:
    """Loads the profile once and answers: which option, as which route, over which link."""

    def __init__(self, config: AdaptiveRouteConfig) -> None:
        if config.profile is None:
            raise ValueError("The adaptive route needs a profile: set evaluation.adaptive.profile (see benchmarks/codecs.py).")
        profile = load_profile(config.profile)
        options = [dataclasses.replace(o, bytes=(round(sum(o.bytes) / len(o.bytes)),)) for o in profile.options]
        link = LinkProfile(config.mbit_per_s, config.rtt_s)
        self.option: RouteOption = AdaptivePolicy(options, link, config.budget_s, config.dev_accuracy_margin).choose(0)
        self.options = options

    @staticmethod
    def route_for(option: RouteOption, senders: Sequence[str]) -> Route:
        kind = option.route
        return Route(kind, () if kind == "receiver" else tuple(senders), label=f"adaptive/{option.name}")

    @staticmethod
    def link_for(option: RouteOption, base: LinkConfig | None) -> LinkConfig:
        """The evaluation's link with the option's codec and layer budget."""
        return dataclasses.replace(base or LinkConfig(), codec=option.codec, layer_budget=option.layer_budget, per_sender={})

    def sub_routes(self, senders: Sequence[str]) -> list[Route]:
        """The routes the encoder must prepare inputs for: the chosen option's."""
        return [self.route_for(self.option, senders)]


class AdaptiveRoute:
    """``adaptive[:A+B]``: answers as the route of the option :class:`AdaptiveChoice` picked, through that route's
    own handler (built for the option's link).

    Args:
        choice: the picked option.
        chosen: the handler of the option's route kind.
    """

    def __init__(self, choice: AdaptiveChoice, chosen: RouteHandler) -> None:
        self.choice, self.chosen = choice, chosen

    def run(self, batch: QuestionBatch, route: Route) -> RouteResult:
        return self.chosen.run(batch, self.choice.route_for(self.choice.option, route.senders))
