"""Device families: declarative decoding profiles, real example payloads, a simulated home.

``build_decoder`` turns a profile name, the readings a pipeline wants and the
profile's options into an :class:`edge.decode.Decoder`. The simulator modules
(``roomsim``, ``simulate``) are imported on demand only.
"""

from __future__ import annotations

from edge.families import DeviceInfo, build_decoder, list_profiles, profile_info, reading_unit

__all__ = ["DeviceInfo", "build_decoder", "list_profiles", "profile_info", "reading_unit"]
