"""Built-in strategies; each module is a plugin registered like a third-party one."""
