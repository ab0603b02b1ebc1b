"""fedrec: a federated, privacy-preserving LLM recommender (Flower + PEFT LoRA + Opacus DP-SGD)."""

__version__ = "0.1.0"
