"""Look inside a fine-tuned timm ViT: attention capture, rollout, metrics, figures, report, card, Hub."""
