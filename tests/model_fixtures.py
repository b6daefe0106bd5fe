"""Helpers for tests that build a tiny AVSRModel."""
import torch


def activate_adapters(model, seed=1):
    """Give the zero-initialised adapter outputs (MoME up-projections, LoRA B) non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith((".up", ".up_b")) or "lora_B" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
