"""HybridLens model zoo: importing this package registers every family with timm."""

from models import capture, cetnet, conv2former, fcvit, moat, mobile_former, vit  # noqa: F401
