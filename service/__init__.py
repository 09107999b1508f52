"""Tuneworks service: the OpenAI-compatible API process (files, jobs, models, the inference gateway)."""
