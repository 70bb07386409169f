"""Channel adapters: one module per partner protocol, plus the base and the registry."""
