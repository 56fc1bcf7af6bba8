"""Kiln: self-hosted image generation with an OpenAI-compatible Images API."""

__version__ = "0.1.0"
