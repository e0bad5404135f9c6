"""The core's own hook implementations: the ``openai`` and ``mock`` providers.

Registered first in every plugin manager under the name ``veil``.
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .providers.mock import MockProvider
from .providers.openai_compat import OpenAICompatProvider
from .registry import ProviderRegistrar

__all__ = ["veil_register_providers"]


@hookimpl
def veil_register_providers(register: ProviderRegistrar) -> None:
    register("openai", OpenAICompatProvider)
    register("openai-compatible", OpenAICompatProvider)
    register("mock", MockProvider)
