"""The activation functions the model families use, by their Hugging Face names (config.json ``hidden_act`` /
``activation_function``)."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["activation"]


# Hugging Face's names for the activations the model families use (config.json hidden_act / activation_function)
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU: BERT, ViT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # tanh approximation: GPT-2
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,  # T5 v1.0
    "silu": F.silu,  # Llama (SwiGLU gate)
    "swish": F.silu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function a Hugging Face config names (``hidden_act``, ``activation_function``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]

