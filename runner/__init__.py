"""Tuneworks runner: the arq worker that validates files and trains LoRA adapters."""
