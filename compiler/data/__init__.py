"""Data access: checkpoint weights (in memory or streamed from safetensors) and text corpora."""
