"""Interop with the wider ecosystem: Hugging Face export/import (`hf`) and int8 inference (`quantize`)."""
