"""The building blocks of DeepSeek models: MLA, the MoE layer, the SwiGLU MLP, RMSNorm, rotary embeddings.

Each layer serves inference, fine-tuning and training; which kernel runs is the ops layer's
business (`dsv3.kernels`), where the attention reads and writes its cache is the attention
backend's (`dsv3.attention`).
"""
