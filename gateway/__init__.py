"""broadcast-gateway: official advisories from Kafka to localized push, SMS and email, once."""

__version__ = "0.1.0"
