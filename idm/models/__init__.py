"""The IDM network: LR encoder, condition pyramid, implicit scale-modulated UNet."""

from idm.models.idm import IDM, Condition
from idm.models.modulation import scale_code

__all__ = ["IDM", "Condition", "scale_code"]
