"""Checkpoint formats: the writers (GGUF, compressed-tensors, HF safetensors) and their registry.

Below the study and the store: a run's speed measure writes its quantized model to a runtime's format
(GGUF for llama.cpp) as the export does; :mod:`ptqlab.export` adds the store, the manifest and the card.
"""
