"""Model families built from ``selfattn.nn.Attention``, loaded from Hugging Face model directories.

    model = selfattn.models.load(path)            # family from config.json's model_type, weights checked strictly
    tok = selfattn.models.load_tokenizer(path)    # tokenizer.json through the `tokenizers` library

Families register themselves with ``register(model_type, config_from_hf, model_cls, convert_state_dict)`` (see
loading.py); ``load`` imports a family's module the first time a checkpoint of that family is loaded.
"""
from .generation import Generative, generate
from .loading import (Family, Tokenizer, families, load, load_checked, load_tokenizer, minilm_path, read_config,
                      read_state_dict, register)

__all__ = ["load", "register", "families", "Family", "read_config", "read_state_dict", "load_checked",
           "load_tokenizer", "Tokenizer", "minilm_path", "generate", "Generative"]
