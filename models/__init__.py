"""HybridLens model zoo: importing this package registers every family with timm."""

from models import capture  # noqa: F401
