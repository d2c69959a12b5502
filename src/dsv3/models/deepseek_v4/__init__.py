"""DeepSeek-V4 (V4-Flash, V4-Pro): sliding-window attention on every layer plus compressed sparse (CSA, 4:1 with an
indexer) or heavily compressed (HCA, 128:1) attention, mHC hyper-connections, hash-routed and sqrtsoftplus-routed
MoE, attention sinks, a grouped low-rank output projection and MTP. `family` declares the config, `model` the
network, `state` the contiguous per-sequence cache, `weights` the checkpoint names (released and transformers')."""
