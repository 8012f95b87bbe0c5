"""Workflows: what a user asks for, composed from the wings below (train, cv, grid, ensemble, ...)."""
