"""Typed configuration: frozen dataclasses loaded from YAML over built-in defaults."""

from appservice.config.loader import ConfigError, load_config, load_config_text
from appservice.config.model import (
    AccountsConfig,
    ApiConfig,
    Config,
    DatabaseConfig,
    FederationConfig,
    KeysConfig,
    ListenConfig,
    LoggingConfig,
    LookupConfig,
    PolicyConfig,
    PolicyDocument,
    ServerConfig,
    TermsConfig,
)

__all__ = [
    "AccountsConfig",
    "ApiConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "FederationConfig",
    "KeysConfig",
    "ListenConfig",
    "LoggingConfig",
    "LookupConfig",
    "PolicyConfig",
    "PolicyDocument",
    "ServerConfig",
    "TermsConfig",
    "load_config",
    "load_config_text",
]
