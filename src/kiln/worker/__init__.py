"""Workers: one loaded diffusers pipeline each, one batch at a time. The only layer that imports torch."""
