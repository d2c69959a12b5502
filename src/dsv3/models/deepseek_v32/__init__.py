"""DeepSeek-V3.2 (V3.2-Exp, V3.2, V3.2-Speciale): DeepSeek-V3's network with DeepSeek Sparse Attention -- a
lightning indexer in every attention layer (`dsv3.layers.indexer`) picks the top-`index_topk` past tokens each
query attends to. The network is the V3 package's; `family` declares the config fields and names."""
