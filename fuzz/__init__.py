"""The reliability campaign: seeded mutants of real checkpoints against an independent page model."""
