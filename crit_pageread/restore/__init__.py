"""Restore flows: squash chains and lazy dumps, ELF cores for gdb, restore pipelines, the dump manifest."""
