"""Tuneworks control plane: the OpenAI-compatible API, its database and its queue."""
