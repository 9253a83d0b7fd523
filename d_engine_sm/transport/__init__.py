"""Network transports for snapshots.

``d_engine_sm.transport.grpc`` (extra ``d_engine_sm[grpc]``, with its private
``_grpc_server``/``_grpc_client``) is all that imports ``grpc``; importing
this package does not.
"""

from __future__ import annotations
