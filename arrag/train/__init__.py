"""FAiD training: the retrieval-augmented training set and (to come) the LoRA + blender trainer."""
