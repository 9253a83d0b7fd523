"""Generated protobuf modules (d-engine 0.2.3 wire format); regenerate with scripts/gen_proto.py."""
