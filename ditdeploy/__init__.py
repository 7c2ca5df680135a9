"""ditdeploy: compiled export and edge deployment of DiT (Diffusion Transformers).

Importing this package is cheap and torch-free; heavy modules (models, training, export) import torch lazily.
"""

__version__ = "0.1.0"
