"""The project's exception types: every error a user can cause is one of these."""


class FedrecError(Exception):
    """Base class; the CLI prints its message as one line and exits non-zero."""


class ConfigError(FedrecError):
    """An invalid setting: the message names the key and what is allowed."""


class DataError(FedrecError):
    """A malformed or inconsistent data file: the message names file, line and problem."""


class AssetError(FedrecError):
    """A data set or model that cannot be fetched, verified or found in the cache."""


class AdapterError(FedrecError):
    """Received or loaded adapter tensors that do not match what is expected."""


class PrivacyError(FedrecError):
    """A privacy setting that cannot be honoured (e.g. δ too large for the number of users)."""


class BudgetExhaustedError(PrivacyError):
    """Training the next round would take a client over its ε budget."""


class RequestError(FedrecError):
    """A bad request to the recommendation service: `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
