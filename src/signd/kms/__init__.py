"""Key management services: where data keys come from and get unwrapped."""

from signd.kms.base import DataKey, KmsClient

__all__ = ["DataKey", "KmsClient"]
