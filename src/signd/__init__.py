"""signd: a signing machine for exchange and custody wallets."""

__version__ = "0.1.0"
