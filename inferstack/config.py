"""Settings read once from the environment: the table lives in inferstack.contract.settings.

Kept as the import path the web tier, the workers, the tools and other branches use.
"""

from __future__ import annotations

from inferstack.contract.settings import (
    PRECISIONS,
    RUNTIMES,
    UPLOAD_MEMORY_BYTES,
    WEB_POD_BASELINE_BYTES,
    WEB_PROCESS_BASELINE_BYTES,
    ConfigError,
    Settings,
    default_model_name,
    web_memory_limit_bytes,
)

__all__ = [
    "PRECISIONS", "RUNTIMES", "UPLOAD_MEMORY_BYTES", "WEB_POD_BASELINE_BYTES", "WEB_PROCESS_BASELINE_BYTES",
    "ConfigError", "Settings", "default_model_name", "web_memory_limit_bytes",
]
