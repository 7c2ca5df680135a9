"""Where weights come from: official .pt, own checkpoints, diffusers snapshots, shipped assets."""
