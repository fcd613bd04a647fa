"""Base models: generic loading (hub, arch, tiny random, quantization, placement) and the packaged
SmolLM2 GGUF conversion."""
