"""mrpf: Module Robust Pruning and Fine-tuning (robustness-aware structured pruning)."""

__version__ = "0.1.0"
