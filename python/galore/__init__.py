"""galore for PyTorch: GaLore optimizers that step through galore's C++ library."""

from .optim import GaLoreAdamW, GaLoreAdamW8bit

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit"]
