"""Tuneworks serving: supervised vLLM servers with run-time LoRA adapters."""
