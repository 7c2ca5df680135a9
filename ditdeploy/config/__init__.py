"""What describes a model, torch-free: architecture configs and variants, class names, MAC counts."""
