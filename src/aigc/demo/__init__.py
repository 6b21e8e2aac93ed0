"""`aigc demo` as a library: pull the pretrained base, prepare the data with its tokenizer, evaluate the
base, LoRA fine-tune, generate, evaluate the fine-tuned run and write the report (`steps.Demo`), with
the demo's own report sections (`report.py`). `aigc.cli.demo` parses the flags and prints progress."""

from __future__ import annotations

from aigc.demo.steps import Clock, Demo, DemoOptions

__all__ = ["Clock", "Demo", "DemoOptions"]
