"""Loading I/O: checkpoints in the Hugging Face layout, safetensors, tokenizers and chat templates.

`checkpoint` maps checkpoint names onto a model and reads (FP8-dequantized) tensors, `load`
picks the loader a checkpoint needs (plain or packed), `save` writes checkpoints back,
`safetensors` reads files lazily, `tokenizer` and `chat_template` turn text into ids and back,
`paths` finds the models shipped in the package.
"""
