"""Backdoor removal for LLMs at cluster scale: poison -> inject -> defend -> evaluate -> report."""
__version__ = "0.1.0"
