"""Prompts of follow-up edits: `composer` (the choice by model), `embedded_rules` (the embedded
model's grammar, attribute by attribute) and `chat_rewriter` (an OpenAI-compatible chat model)."""
