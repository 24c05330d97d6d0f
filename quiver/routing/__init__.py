"""Routing between the experts of a library: the routed layer and one file per router."""

from quiver.routing.arrow import ArrowRouter
from quiver.routing.centroid import CentroidRouter
from quiver.routing.layer import MIXTURES, MixtureStrategy, RoutedLinear
from quiver.routing.model import RoutingContext, attach_experts, detach_experts
from quiver.routing.phatgoose import PhatgooseRouter
from quiver.routing.spectr import SpectrRouter
from quiver.routing.uniform import UniformRouter

__all__ = [
    "MIXTURES",
    "ArrowRouter",
    "CentroidRouter",
    "MixtureStrategy",
    "PhatgooseRouter",
    "RoutedLinear",
    "RoutingContext",
    "SpectrRouter",
    "UniformRouter",
    "attach_experts",
    "detach_experts",
]
