"""The device tier: :class:`popex.device.client.DeviceClient` and ``popex device classify``."""

from popex.device.client import DeviceAnswer, DeviceClient

__all__ = ["DeviceAnswer", "DeviceClient"]
