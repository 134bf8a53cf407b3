"""Data: per-domain text sources, tokenizers, packing, the mixture sampler, validation sets."""
