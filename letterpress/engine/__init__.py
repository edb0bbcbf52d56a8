"""Rows, scheduler, runner and the `LLM` API."""
