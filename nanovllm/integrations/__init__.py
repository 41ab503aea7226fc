"""Integrations with other systems. Each submodule imports its optional dependency itself (nanovllm.integrations.ray
needs `pip install -e ".[ray]"`), so importing this package needs nothing extra."""
