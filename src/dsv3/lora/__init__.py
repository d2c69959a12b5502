"""LoRA fine-tuning: adapters in PEFT's format over MLA, dense MLPs, shared and (opt-in) routed experts."""

from dsv3.lora.apply import AdapterError, LoRASpec, inject_lora, set_merged, set_slot_ids, unload
from dsv3.lora.multi import load_stacked
from dsv3.lora.peft_io import load_adapter, save_adapter

__all__ = ["AdapterError", "LoRASpec", "inject_lora", "load_adapter", "load_stacked", "save_adapter", "set_merged",
           "set_slot_ids", "unload"]
