"""Integrations with other libraries. Each submodule imports its library lazily, inside its
functions: importing `sparse_attn` never imports them."""
