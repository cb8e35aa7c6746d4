"""FAiD training: the retrieval-augmented training set (construct.py) and the LoRA + blender trainer (train_faid.py)."""
