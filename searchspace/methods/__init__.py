"""Built-in compression methods: one module each, registered on import."""
