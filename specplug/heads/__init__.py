"""Trained draft heads: the networks (``nets``), their config and checkpoints (``checkpoint``).

Framework-free torch modules. They read the target's hidden features and borrow the target's
token embedding and LM head (restricted to a draft vocabulary), which are never saved with a
head: a checkpoint holds only what was trained.
"""
