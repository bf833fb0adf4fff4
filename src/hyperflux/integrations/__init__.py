"""Hyperflux inside the trainers users already have: a PyTorch Lightning callback (`hyperflux[lightning]`)
and a Hugging Face transformers `TrainerCallback` (`hyperflux[hf]`). Import the submodule you need."""
