"""VideoChat-Flash vision side: the UMT ViT and InternVideo2 video encoders and the ToMe token-merging projector."""

from .internvideo2 import InternVideo2VisionTower
from .token_merging import ToMeProjector
from .umt import UMTVisionTower

__all__ = ["InternVideo2VisionTower", "ToMeProjector", "UMTVisionTower"]
