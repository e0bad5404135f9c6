"""Pretrained routers shipped with veil-routing.

``GPT4_MIXTRAL``: GPT-4-1106 (strong) vs Mixtral-8x7B-Instruct (weak), trained
with ``veil route train --bits 16 --min-df 5`` on the 9,347 RouteLLM rows
(MMLU, GSM8K, MT-Bench; lm-sys/RouteLLM, Apache-2.0) of the project's dev data.
Map a pool's models onto its two names in the policy. Its SHA-256 is below;
pin it in the policy like any other artifact.
"""

from __future__ import annotations

from pathlib import Path

GPT4_MIXTRAL = Path(__file__).with_name("gpt4-mixtral.veilrouter")
GPT4_MIXTRAL_SHA256 = "fafcb7d54682c78326d1830391f0659f4643b1ca30095bac6fc969aa6d8ced94"
GPT4_MIXTRAL_MODELS = ("gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1")

__all__ = ["GPT4_MIXTRAL", "GPT4_MIXTRAL_MODELS", "GPT4_MIXTRAL_SHA256"]
