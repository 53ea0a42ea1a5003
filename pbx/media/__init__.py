"""Media: RTP/RTCP relay sessions, the RTP port allocator and per-stream QoS.

The public face of the package; other packages import only from here.  SDP parsing and
rewriting live in :mod:`pbx.sip.sdp` (a codec) and :class:`SDPError` is re-exported so
the call layer can answer 488 without importing the codec module.
"""

from pbx.media.ports import PortAllocator, PortError, PortsExhausted
from pbx.media.qos import StreamQoS, estimate_mos
from pbx.media.relay import REJECT_REASONS, RelayLeg
from pbx.media.session import (
    DEFAULT_CODECS,
    DirectionStats,
    MediaSession,
    MediaStats,
    Side,
)
from pbx.sip import SDPError

__all__ = [
    "DEFAULT_CODECS",
    "REJECT_REASONS",
    "DirectionStats",
    "MediaSession",
    "MediaStats",
    "PortAllocator",
    "PortError",
    "PortsExhausted",
    "RelayLeg",
    "SDPError",
    "Side",
    "StreamQoS",
    "estimate_mos",
]
