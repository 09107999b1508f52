"""Tuneworks core: what every process shares (settings, database, job status, queue contract, store, job spec)."""
