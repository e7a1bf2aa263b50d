"""VideoChat-Flash vision side: the UMT ViT video encoder and the ToMe token-merging projector."""

from .token_merging import ToMeProjector
from .umt import UMTVisionTower

__all__ = ["ToMeProjector", "UMTVisionTower"]
