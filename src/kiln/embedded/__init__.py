"""Kiln's own tiny text-to-image model: procedural scenes, their captions, training and scoring.

Nothing here is imported by the serving path; the trained pipeline is loaded like any other
diffusers model, through the model registry.
"""
