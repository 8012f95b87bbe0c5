"""Training: the explicit fit loop, optimisers and schedules, stages, feature caches, exact resume."""
