"""DoGraph: model-centric data mixing for LLM pretraining (reference implementation)."""

__version__ = "0.1.0"
