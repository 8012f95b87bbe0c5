"""Models: networks (a timm backbone or a simple CNN under a head), weights, freezing, checkpoints,
and the objective that turns outputs into losses and probabilities."""
