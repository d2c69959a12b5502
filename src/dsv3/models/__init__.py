"""Model families: one package per family (`deepseek_v3` serves DeepSeek-V3/R1, V2, Moonlight, Kimi-K2)."""
