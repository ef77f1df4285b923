"""Generated gRPC/protobuf modules for the recsvc.v1 API (`make proto`)."""
