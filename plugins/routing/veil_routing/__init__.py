"""veil-routing: the cheapest model that clears the bar, with failover,
circuit breakers, learned routing and output budgets.

This module holds the plugin's hook implementations (from
:mod:`veil_routing.plugin`); the work is done in :mod:`veil_routing.stage`
(the request-path stage), :mod:`veil_routing.rules` (static rules),
:mod:`veil_routing.balance` (load balancing), :mod:`veil_routing.breaker`
(circuit breakers), :mod:`veil_routing.strategy` (pool strategies),
:mod:`veil_routing.feedback_route` (``POST /v1/feedback``) and
:mod:`veil_routing.admin_route` (``GET /admin/routing``).
"""

from __future__ import annotations

from .plugin import (
    veil_register_commands,
    veil_register_routes,
    veil_register_stages,
    veil_settings_model,
    veil_shutdown,
    veil_startup,
)

__all__ = [
    "__version__",
    "veil_register_commands",
    "veil_register_routes",
    "veil_register_stages",
    "veil_settings_model",
    "veil_shutdown",
    "veil_startup",
]

__version__ = "0.1.0"
