"""DeepSeek-V2 (and V2-Lite): DeepSeek-V3's network with softmax routing (`greedy` / `group_limited_greedy`) and no
MTP; `family` declares it with V2's router defaults and architecture name over the V3 package's code."""
