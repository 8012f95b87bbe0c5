"""Data: scan folders and CSVs into an index, decode once into a cache, and feed batches (with
augmentation) to training and evaluation. Also `imgclf audit` and what users name as inputs."""
