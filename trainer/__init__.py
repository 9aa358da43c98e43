"""Training: fine-tune a torchvision backbone by transfer learning (needs the `train` extra)."""
