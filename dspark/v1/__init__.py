"""Generated protobuf/gRPC modules (`make proto`); do not edit the `*_pb2*` files by hand."""
