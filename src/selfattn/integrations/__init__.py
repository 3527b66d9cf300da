"""Bridges from other libraries to ``selfattn.attention``. Each submodule imports its library itself, so importing
``selfattn`` never imports them (they stay optional dependencies).

    from selfattn.integrations.transformers import register   # needs transformers 5.x
    register()   # then attn_implementation="selfattn"
"""
__all__ = ["transformers"]
