"""Network transports for snapshots.

``d_engine_sm.transport.grpc`` (extra ``d_engine_sm[grpc]``) is the only
module that imports ``grpc``; importing this package does not.
"""

from __future__ import annotations
