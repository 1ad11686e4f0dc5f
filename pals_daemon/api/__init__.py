"""Generated gRPC code for proto/pals/v1/pals.proto (do not edit; run scripts/gen_proto.py)."""
