"""Parameter-efficient adapters in plain PyTorch (imports torch only)."""
