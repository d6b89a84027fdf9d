"""The model core: a timm ViT as a transformers model (`vit`), where its tokens are (`tokens`), timm's
transforms (`transforms`) and every reach into timm's internals (`timm_internals`).

``from analysis.modeling import TimmViTForImageClassification`` is the public way in (README).
"""
from analysis.modeling.timm_internals import capture_attentions
from analysis.modeling.vit import TimmViTForImageClassification

__all__ = ['TimmViTForImageClassification', 'capture_attentions']
