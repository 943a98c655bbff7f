"""runway-gateway: one key-managed, quota-enforcing endpoint in front of a Runway gen2 relay."""

__version__ = "0.1.0"
