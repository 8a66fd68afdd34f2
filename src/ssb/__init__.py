"""ssb: Semantic Soft Bootstrapping, RL-free self-distillation for LLM math reasoning."""

__version__ = "0.1.0"
